"""The xcube server config entry of the checked grid store (:mod:`cube_gen.xcube_levels`),
in a module of its own: writing a config must not import xcube (``deepearth serve`` writes
it, then becomes ``xcube serve``, which imports xcube once)."""

from __future__ import annotations

from typing import Any


def store_config(url: str, datasets: list[dict], storage_options: dict | None = None,
                 version: str | None = None) -> dict:
    """An xcube ``DataStores`` entry serving the grid pyramids through the checked store;
    ``datasets``: entries with ``Identifier`` (a grid cube key) plus Style, Variables, ..."""
    params: dict[str, Any] = {"url": url}
    if storage_options:
        params["storage_options"] = dict(storage_options)
    if version is not None:
        params["version"] = version
    return {"Identifier": "deepearth", "StoreId": "deepearth", "StoreParams": params,
            "Datasets": [{"Path": d["Identifier"], **d} for d in datasets]}
