"""The OpenAPI document only grows: every operation of the recorded list is still there.

``tests/data/openapi_operations.json`` is the operation list (method, path, operationId
and query/path parameters with their defaults) of the server's OpenAPI document as it was
before the server was restructured (issue 11). The document of today's server must hold
every one of them unchanged: new operations and new parameters may be added, nothing may
be removed, renamed or given another default. Regenerate the file only when an API change
is intended (``python tests/test_openapi_operations.py CUBESET``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECORDED = Path(__file__).parent / "data" / "openapi_operations.json"
METHODS = ("get", "post", "put", "delete", "head", "patch", "options")


def operations(doc: dict) -> list[dict]:
    """(method, path, operationId, parameters) of every operation of an OpenAPI document."""
    ops = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            params = sorted(
                f"{p['in']}:{p['name']}"
                + (f"={json.dumps(p['schema']['default'])}" if "default" in p.get("schema", {})
                   else "")
                for p in op.get("parameters", []))
            ops.append({"method": method.upper(), "path": path,
                        "operationId": op.get("operationId"), "parameters": params})
    return sorted(ops, key=lambda o: (o["path"], o["method"]))


def served_operations(cubeset: str) -> list[dict]:
    """The operations of an in-process xcube Server with the ``deepearth serve`` config."""
    from xcube.server.server import Server
    from xcube.server.webservers.tornado import TornadoFramework

    from server.launch import make_config

    server = Server(TornadoFramework(), make_config(cubeset))
    try:
        return operations(server.ctx.get_open_api_doc())
    finally:
        server.ctx.on_dispose()


def test_openapi_operations_are_a_superset_of_the_recorded_ones(tiny_cubes):
    recorded = json.loads(RECORDED.read_text())
    assert len(recorded) >= 44
    now = {(o["method"], o["path"]): o for o in served_operations(str(tiny_cubes))}
    missing = [f"{o['method']} {o['path']}" for o in recorded
               if (o["method"], o["path"]) not in now]
    assert not missing, f"operations removed: {missing}"
    for old in recorded:
        new = now[(old["method"], old["path"])]
        assert new["operationId"] == old["operationId"], (old["path"], new["operationId"])
        lost = sorted(set(old["parameters"]) - set(new["parameters"]))
        assert not lost, f"{old['operationId']}: parameters removed or defaults changed: {lost}"


if __name__ == "__main__":  # regenerate: python tests/test_openapi_operations.py CUBESET
    ops = served_operations(sys.argv[1])
    RECORDED.write_text("[\n" + ",\n".join(json.dumps(o) for o in ops) + "\n]\n")
    print(f"{len(ops)} operations written to {RECORDED}")
