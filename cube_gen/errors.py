"""Errors raised by cube_gen, each naming what was wrong, where, and what was expected."""

from __future__ import annotations


class DeepEarthError(Exception):
    """Base class of the project's own errors."""


class SourceError(DeepEarthError, ValueError):
    """The source dataset breaks its published layout.

    ``file`` is the path of the offending file, ``row`` its row (0-based) where known,
    ``column`` the column, ``expected`` what the layout requires.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        expected: str | None = None,
    ):
        self.file = file
        self.row = row
        self.column = column
        self.expected = expected
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        text = message
        if where:
            text = f"{', '.join(where)}: {message}"
        if expected is not None:
            text += f" (expected {expected})"
        super().__init__(text)


class RecipeError(DeepEarthError, ValueError):
    """A recipe is invalid; ``path`` is the key path in the YAML file, e.g. ``cubes.vision.chunks``."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None):
        self.file = file
        self.path = path
        prefix = ""
        if file:
            prefix += f"{file}: "
        if path:
            prefix += f"{path}: "
        super().__init__(prefix + message)


class CubeError(DeepEarthError):
    """A cube set is missing, incomplete or not in the expected layout."""


class NotFoundError(DeepEarthError, KeyError):
    """An id (gbif_id, image number, species) does not exist in the cube set.

    ``parameter`` names what was looked up (``gbif_id``, ``image_number``, ``species``),
    ``value`` the value given and ``allowed`` what would have been valid, where known.
    """

    def __init__(self, message: str = "not found", *, parameter: str | None = None,
                 value=None, allowed=None):
        super().__init__(message)
        self.parameter = parameter
        self.value = value
        self.allowed = allowed

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


class NotMaterialised(NotFoundError):
    """Data a simulated cube set (``deepearth simulate``) does not hold: its full feature
    tensors and attention maps exist only for a sample of the images (the manifest's
    ``simulated.materialised``). Answered 404, never zeros."""


class ChunkError(CubeError):
    """A chunk (or other object) of a cube cannot be used as data.

    ``cube`` is the cube's path in the set (``vision.zarr``), ``array`` the array
    (``features``, ``grid.levels/0.zarr/observation_count``), ``key`` the chunk key
    (``c/3/0/0/0/0``); ``version`` the release it belongs to, where known.
    """

    what = "is unusable"

    def __init__(self, cube: str, array: str, key: str, detail: str = "", *,
                 url: str | None = None, version: str | None = None):
        self.cube = cube
        self.array = array
        self.key = key
        self.url = url
        self.version = version
        where = f"{cube}/{array}/{key}" if array else f"{cube}/{key}"
        text = f"chunk {where} {self.what}"
        if version:
            text += f" (cube set version {version})"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    @property
    def chunk(self) -> str:
        """The chunk's path inside its cube set version, e.g. ``vision.zarr/features/c/3/0/0/0/0``."""
        return "/".join(p for p in (self.cube, self.array, self.key) if p)


class ChunkMissing(ChunkError):
    """A chunk the release manifest lists is absent from the store."""

    what = "is missing"


class ChunkCorrupt(ChunkError):
    """A chunk is present but truncated, of the wrong size or fails its checksum."""

    what = "is damaged"


class StorageUnavailable(DeepEarthError):
    """The storage (object store, file system) cannot be reached or did not answer in time."""


class VersionNotFound(CubeError, KeyError):
    """A cube set version that does not exist (``CubeSet.open(target, version=...)``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "version not found"


class UsageError(DeepEarthError, ValueError):
    """A command line or call that cannot be run as given (the CLI exits with status 2)."""
