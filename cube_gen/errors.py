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
    """An id (gbif_id, image number, species) does not exist in the cube set."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"
