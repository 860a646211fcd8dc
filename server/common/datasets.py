"""Helpers over xcube's datasets context shared by the APIs (WMTS, viewer support, new
versions of the cube set)."""

from __future__ import annotations


def warm_indexes(ml_dataset) -> int:
    """Compute the lazily cached properties of every level's coordinate indexes now;
    returns how many indexes were warmed.

    pandas builds an index's engine and its uniqueness/monotonicity flags on first use and
    that is not thread-safe: two tiles selecting a time at once on a fresh index can fail
    with "Reindexing only valid with uniquely valued Index objects" (HTTP 500 in xcube's
    nearest-time lookup). Done once before requests arrive, the worker threads only read
    them.
    """
    warmed = 0
    for level in range(ml_dataset.num_levels):
        ds = ml_dataset.get_dataset(level)
        for index in ds.xindexes.to_pandas_indexes().values():
            warmed += 1
            if len(index) == 0:
                continue
            _ = index.is_unique, index.is_monotonic_increasing, index.is_monotonic_decreasing
            if index.is_unique:
                monotonic = index.is_monotonic_increasing or index.is_monotonic_decreasing
                index.get_indexer(index[:1], method="nearest" if monotonic else None)
                index.get_loc(index[0])
    return warmed


def warm_datasets(datasets_ctx, dataset_ids: list[str]) -> int:
    """:func:`warm_indexes` of every level of the datasets; returns how many indexes were
    warmed. Datasets that fail to open are left to xcube (it reports them on first use)."""
    warmed = 0
    for ds_id in dataset_ids:
        try:
            ml = datasets_ctx.get_ml_dataset(ds_id)
        except Exception:  # noqa: BLE001 - xcube answers for a broken dataset itself
            continue
        warmed += warm_indexes(ml)
    return warmed


def follow_version(datasets_ctx, cubeset) -> list[str]:
    """Serve ``cubeset`` (a new version) in xcube's datasets read through the ``deepearth``
    data store (:class:`cube_gen.xcube_levels.DeepEarthDataStore`); returns the ids of the
    datasets swapped.

    Each such store follows the version; each pyramid xcube had opened from one is opened
    again on it, its indexes warmed (:func:`warm_indexes`), then put into xcube's dataset
    cache in one assignment: a request reads the pyramid it looked up, of one version.
    """
    from cube_gen.xcube_levels import DeepEarthDataStore

    pool = datasets_ctx.get_data_store_pool()
    stores = {}
    for sid in pool.store_instance_ids:
        if pool.get_store_config(sid).store_id != "deepearth":
            continue
        store = pool.get_store(sid)
        if isinstance(store, DeepEarthDataStore) and store.follow(cubeset):
            stores[sid] = store
    swapped = []
    for ds_id, (_, config) in list(datasets_ctx.dataset_cache.items()):
        store = stores.get(config.get("StoreInstanceId"))
        if store is None:
            continue
        ml = store.open_data(str(config["Path"]))
        ml.ds_id = ds_id
        warm_indexes(ml)
        datasets_ctx.dataset_cache[ds_id] = (ml, config)
        swapped.append(ds_id)
    return swapped
