// DeepEarth Cube: make the viewer talk to the server that served it.
// xcube Viewer reads its API server from the `serverUrl` query parameter, else from
// config.json (http://localhost:8080). This runs before the viewer's module scripts and
// sets `serverUrl` to this page's origin plus any path prefix before /viewer, so any
// port, host name or reverse-proxy prefix works.
(function () {
  var params = new URLSearchParams(window.location.search);
  if (params.has("serverUrl")) {
    return;
  }
  var path = window.location.pathname;
  var at = path.lastIndexOf("/viewer");
  var prefix = at > 0 ? path.substring(0, at) : "";
  params.set("serverUrl", window.location.origin + prefix);
  window.history.replaceState(
    window.history.state, "", path + "?" + params.toString() + window.location.hash);
})();
