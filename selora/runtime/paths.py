"""``resolve_inside(root, path)``: a client-given relative path as a directory inside ``root``.

Total: whatever ``path`` is (not a string, empty, NUL bytes, lone surrogates, over-long
components or paths, absolute, ``..``, symlinks leaving the root, symlink loops), the answer is
the resolved path or an ``UnsafePathError`` whose message names only the client's own path
(shortened), never a server path.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_PATH_BYTES = 1024  # the whole relative path, UTF-8
MAX_COMPONENT_BYTES = 255  # one component (NAME_MAX of common filesystems)


class UnsafePathError(ValueError):
    """A path that is not a plain relative path inside the root."""


def _shown(path: str) -> str:
    return repr(path[:80] + ("..." if len(path) > 80 else ""))


def resolve_inside(root: Path, path: object, files: tuple[str, ...] = ()) -> Path:
    """``root / path`` resolved (symlinks followed), proven to stay inside the resolved ``root``;
    each of ``files`` that exists in it must resolve inside ``root`` too."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError("path must be a non-empty string")
    shown = _shown(path)
    if "\x00" in path:
        raise UnsafePathError(f"path {shown} holds a NUL character")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"path {shown} is not valid Unicode text") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePathError(f"path is {len(encoded)} bytes long; the limit is {MAX_PATH_BYTES}")
    parts = Path(path).parts
    if os.path.isabs(path) or ".." in parts:
        raise UnsafePathError(f"path {shown} must be relative, without '..'")
    if any(len(p.encode("utf-8")) > MAX_COMPONENT_BYTES for p in parts):
        raise UnsafePathError(f"path {shown} has a component over {MAX_COMPONENT_BYTES} bytes")
    root = root.resolve()
    try:
        resolved = (root / path).resolve()
        inside = resolved == root or root in resolved.parents
        links_out = [f for f in files if (resolved / f).exists() and root not in (resolved / f).resolve().parents]
    except (OSError, RuntimeError):  # symlink loops (ELOOP / "Symlink loop"), names the OS refuses
        raise UnsafePathError(f"path {shown} cannot be resolved (a symlink loop or a name the filesystem refuses)") from None
    if not inside:
        raise UnsafePathError(f"path {shown} leaves the root")
    if links_out:
        raise UnsafePathError(f"{links_out[0]} under path {shown} is a link that leaves the root")
    return resolved
