"""Encode step: xarray datasets from the schema, Zarr encodings from the recipe, writing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from .schema import Var


def _resolve_chunks(spec: Var, shape: tuple[int, ...]) -> tuple[int, ...]:
    if spec.chunks is None:
        return tuple(max(s, 1) for s in shape)
    return tuple(max(min(c if c is not None else s, s), 1)
                 for c, s in zip(spec.chunks, shape, strict=True))


def dataset_from_spec(spec: Mapping[str, Var], coords: Mapping[str, np.ndarray],
                      data: Mapping[str, np.ndarray], lazy: Iterable[str],
                      sizes: Mapping[str, int], dtypes: Mapping[str, str] | None = None) -> xr.Dataset:
    """A dataset with the schema's dims, dtypes and CF attributes.

    ``coords`` and ``data`` give values; names in ``lazy`` become unwritten (dask zeros)
    placeholders whose chunks are filled later; names in none of them are left out.
    """
    dtypes = dict(dtypes or {})
    variables = {}
    for name, var in spec.items():
        if name in coords or name in data:
            values = np.asarray(coords.get(name, data.get(name)))
            if var.dtype not in ("str", "datetime64[ns]"):
                values = values.astype(var.dtype, copy=False)
            variables[name] = xr.Variable(var.dims, values, dict(var.attrs))
        elif name in lazy:
            shape = tuple(sizes[d] for d in var.dims)
            dtype = dtypes.get(name, var.dtype)
            arr = da.zeros(shape, dtype=dtype, chunks=_resolve_chunks(var, shape))
            variables[name] = xr.Variable(var.dims, arr, dict(var.attrs))
    ds = xr.Dataset({k: v for k, v in variables.items() if k not in coords})
    return ds.assign_coords({k: variables[k] for k in coords if k in variables})


def compressors(cfg: Mapping[str, Any] | None, zarr_format: int, dtype: np.dtype):
    """Compressor list for a variable from a recipe ``compressor`` mapping."""
    if not cfg or cfg.get("name") in (None, "none"):
        return None
    name, level = cfg["name"], int(cfg.get("level", 3))
    shuffle = cfg.get("shuffle", "shuffle")
    if zarr_format == 3:
        from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

        if name == "zstd":
            return [ZstdCodec(level=level)]
        if name == "gzip":
            return [GzipCodec(level=min(level, 9))]
        typesize = max(int(np.dtype(dtype).itemsize), 1) if np.dtype(dtype).kind != "O" else 1
        return [BloscCodec(cname=name, clevel=min(level, 9), shuffle=shuffle, typesize=typesize)]
    import numcodecs

    if name == "zstd":
        return [numcodecs.Zstd(level=level)]
    if name == "gzip":
        return [numcodecs.GZip(level=min(level, 9))]
    shuffles = {"shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
                "noshuffle": numcodecs.Blosc.NOSHUFFLE}
    return [numcodecs.Blosc(cname=name, clevel=min(level, 9), shuffle=shuffles[shuffle])]


def encoding_for(ds: xr.Dataset, spec: Mapping[str, Var], cfg: Mapping[str, Any],
                 chunks: Mapping[str, tuple[int, ...]],
                 n_rows: Mapping[str, int] | None = None) -> dict[str, dict]:
    """Per-variable encoding: chunks (explicit, else from the schema) and compressors."""
    enc: dict[str, dict] = {}
    for name, var in ds.variables.items():
        if name in ds.dims and name not in spec:
            continue
        shape = var.shape
        if name in chunks:
            c = tuple(max(min(cc, s), 1) for cc, s in zip(chunks[name], shape, strict=True))
        elif name in spec:
            c = _resolve_chunks(spec[name], shape)
        else:
            c = tuple(max(s, 1) for s in shape)
        e: dict[str, Any] = {"chunks": c}
        comp = compressors(cfg.get("compressor"), cfg["zarr_format"], var.dtype)
        e["compressors"] = comp if comp is not None else None
        if var.dtype.kind == "M":
            e["units"] = "nanoseconds since 1970-01-01"
            e["dtype"] = "int64"
        enc[name] = e
    return enc


def write_dataset(ds: xr.Dataset, url: str, storage_options: Mapping[str, Any] | None,
                  encoding: Mapping[str, dict], zarr_format: int, compute: bool = True) -> None:
    """Write a whole dataset (or only its template with ``compute=False``)."""
    kwargs: dict[str, Any] = {}
    if storage_options:
        kwargs["storage_options"] = dict(storage_options)
    # dask placeholders must be chunked like the Zarr arrays; for a template (never
    # computed) one dask chunk per array (a multiple of any Zarr chunk) keeps the graph to a
    # task per variable instead of one per Zarr chunk (minutes and GBs at 800,000 images)
    for name, e in encoding.items():
        if name in ds.variables and isinstance(ds[name].data, da.Array):
            if not compute:  # a fresh single-chunk placeholder: no per-chunk history
                var = ds[name]
                ds[name] = var.copy(data=da.zeros(var.shape, dtype=var.dtype, chunks=var.shape))
                continue
            unit = e.get("shards") or e["chunks"]
            ds[name] = ds[name].chunk(dict(zip(ds[name].dims, unit, strict=True)))
    ds.to_zarr(url, mode="w", encoding=dict(encoding), zarr_format=zarr_format,
               consolidated=True, compute=compute, **kwargs)


def open_staged_template(url: str, storage_options: Mapping[str, Any] | None) -> xr.Dataset | None:
    """Open a staged cube's metadata, or None when there is none (or it is unreadable)."""
    try:
        return xr.open_zarr(url, consolidated=False, storage_options=dict(storage_options or {}) or None)
    except Exception:  # noqa: BLE001 - any unreadable staging is rebuilt
        return None


def rewrite_arrays(url: str, storage_options: Mapping[str, Any] | None,
                   values: Mapping[str, np.ndarray],
                   attrs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write new ``values`` (and attribute updates) into existing arrays of a staged cube,
    then consolidate its metadata again.

    For a cube taken from the previous release with these arrays' chunks left out
    (:func:`cube_gen.release.take_tree`): every chunk is written, and one that equals the
    fill value stays absent, as in a fresh write. Shapes must match the arrays'.
    """
    import zarr

    from .errors import CubeError
    from .store import zarr_store

    store = zarr_store(url, dict(storage_options or {}))
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    for name, data in values.items():
        arr = group[name]
        data = np.asarray(data)
        if data.shape != arr.shape:
            raise CubeError(f"{url}/{name}: new values of shape {data.shape} do not fit the "
                            f"array's shape {arr.shape}")
        arr[...] = data.astype(arr.dtype, copy=False)
        if attrs and name in attrs:
            arr.attrs.update(dict(attrs[name]))
    zarr.consolidate_metadata(store)
