"""Atomic file writes: write to a temporary file beside the target, fsync, then rename over it.

A reader (or a crash) never sees a half-written checkpoint, prediction or JSON file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medseg3d.errors import OutputError, OutputExistsError, os_error_message

#: Below this many free bytes a failed write is taken as a full disk.
_FULL_BYTES = 1 << 20
_UMASK = os.umask(0)  # read the process umask once (os.umask can only read it by setting it)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to `path`.

    The temporary name keeps the target's suffixes (`.nii.gz`, `.npy`, ...) so writers that pick a
    format from the extension behave. On an exception the temporary file is removed and `path`
    is untouched. With `overwrite=False` an existing `path` raises `OutputExistsError`. No
    permission, a read-only file system or a full disk (`OSError` EACCES/EPERM/EROFS/ENOSPC/EDQUOT
    from the folder's creation, the writer or the rename; or any writer error with under 1 MB left
    on the disk) raise `OutputError` naming `path`.
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise OutputExistsError(f"{target} already exists; pass --overwrite to replace it")
    suffix = "".join(target.suffixes) or ".tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=suffix, dir=target.parent)
        os.close(fd)
    except OSError as exc:
        _raise_output_error(exc, target)
        raise
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, target)
    except BaseException as exc:
        # a writer that hides errno on a full disk (torch.save's zip writer raises RuntimeError, numpy's
        # tofile "OSError: 71208 requested and 8128 written" with no errno) is recognised by the free
        # space left, measured before the temporary file is removed
        full = not isinstance(exc, KeyboardInterrupt) and _free_bytes(target.parent) < _FULL_BYTES
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            _raise_output_error(exc, target)
        if full:
            _raise_output_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), target)
        raise


def _free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer can still use on `folder`'s file system (large when unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _raise_output_error(exc: OSError, target: Path) -> None:
    """Raise `OutputError` naming `target` for a permission / read-only / full-disk error; else return."""
    message = os_error_message(exc, target, atomic_write=True)
    if message is not None:
        raise OutputError(message) from exc


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = True) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> None:
    """Write raw bytes to `path` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
