"""What every API of the plugin shares (see docs/architecture.md).

* :mod:`.handler`: THE handler base and :func:`~.handler.endpoint`, the route declaration;
* :mod:`.errors`: problems answered to clients and THE exception -> HTTP status table;
* :mod:`.params`: single-value parsers and parameter groups (OpenAPI + validated value);
* :mod:`.resources`: worker pools (timeout, back-pressure), response budget, named caches;
* :mod:`.cache`: the byte-bounded LRU and the byte budget; :mod:`.ows`: the OWS error
  envelope; :mod:`.datasets`: helpers over xcube's datasets context; :mod:`.safety`: no
  tracebacks in any response of the process.
"""
