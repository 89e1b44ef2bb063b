"""Guards for the user's files: manifest paths stay inside their folder, an output folder
is replaced only when it holds the same adapter (or the user said ``overwrite``), folders
are swapped without a moment where neither exists, and scratch folders that a killed
process left are found by their free lock and removed.

Only the standard library is imported, so every check here runs before any model loads.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

from adapterkit.errors import OutputError, UnsafePathError

MANIFEST = "adapterkit.json"  # artifact.MANIFEST (artifact imports this module)


# -- paths from manifests --------------------------------------------------------------------

def member(folder: str | os.PathLike, name: str, source: str = MANIFEST) -> Path:
    """``folder / name`` for a file name read from ``source``; refuses absolute paths, ``..``,
    separators and a symlink that leads out of ``folder``: a manifest is someone else's text."""
    if (not isinstance(name, str) or not name or "\x00" in name or name in (".", "..")
            or PurePosixPath(name).name != name or PureWindowsPath(name).name != name):
        raise UnsafePathError(f"{Path(folder) / str(name)}: {source} lists {name!r}, which is not a "
                              "plain file name inside the adapter folder (absolute paths, '..' and "
                              "sub-folders are refused)")
    path = Path(folder) / name
    root = Path(folder).resolve()
    if path.is_symlink() and root not in path.resolve().parents:
        raise UnsafePathError(f"{path}: a symlink that leads outside {folder}; refused")
    return path


# -- output folders ----------------------------------------------------------------------------

def _manifest_of(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def replaceable(folder: Path, name: str | None, stage: str | None) -> bool:
    """True when ``folder`` holds an adapterkit artifact with this ``name`` and ``stage``: the
    user is re-running the same job, so replacing it is what they asked for."""
    manifest = _manifest_of(folder)
    return (manifest is not None and name is not None
            and manifest.get("name") == name and manifest.get("stage") == stage)


def _writable_ancestor(path: Path) -> Path:
    """The nearest folder that exists at or above ``path`` (where the first mkdir happens)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_dir(out: str | os.PathLike, *, name: str | None, stage: str | None,
                     overwrite: bool = False, key: str = "output.dir") -> Path:
    """Refuse, before anything is computed, an output that would destroy the user's files or
    that cannot be written: a file, a non-empty folder holding something else, a read-only
    place. ``key`` names the setting or flag in the message."""
    out = Path(out).expanduser()
    flag = "--overwrite" if key.startswith("--") else "output.overwrite=true"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{key} {out}: exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not replaceable(out, name, stage):
        what = _manifest_of(out)
        held = (f"the {what.get('stage')} adapter {what.get('name')!r}" if what and what.get("stage")
                else "files that are not this adapter")
        raise OutputError(f"{key} {out}: already holds {held}; refusing to replace it. Choose "
                          f"another folder, or pass {flag} to replace it")
    parent = _writable_ancestor(out if out.exists() else out.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{key} {out}: {parent} is not a writable folder; nothing would be saved")
    return out


# -- swapping folders -------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``. An existing ``dst`` is exchanged with ``src`` in one step (no
    moment where ``dst`` is missing), then the old contents are removed."""
    if dst.exists() and _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)
        return
    if dst.exists():  # no renameat2 here: the two-rename fallback
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# -- scratch folders a kill -9 leaves ------------------------------------------------------------

@contextmanager
def locked_scratch(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder ``parent/<prefix><token>`` whose sibling ``.lock`` file is flocked while
    this process lives, so ``sweep_scratch`` can tell a dead owner's folder from a live one.
    Stale ones with the same prefix are removed first. The folder is the caller's to remove
    or move away; the lock file goes when the block ends."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_scratch(parent, prefix)
    token = uuid.uuid4().hex[:12]
    lock_path = parent / f"{prefix}{token}.lock"
    lock = open(lock_path, "x")
    fcntl.flock(lock, fcntl.LOCK_EX)
    folder = parent / f"{prefix}{token}"
    try:
        folder.mkdir()
        yield folder
    finally:
        try:
            os.unlink(lock_path)
        finally:
            lock.close()


def sweep_scratch(parent: Path, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix>*`` folders whose lock no live process holds; returns them."""
    removed = []
    for lock_path in sorted(parent.glob(f"{prefix}*.lock")):
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                folder = lock_path.with_suffix("")
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
                os.unlink(lock_path)
        except OSError:
            continue  # held by a live process, or gone already
    return removed


_HELD: list = []  # lock files of the scratch folders this process owns until it exits


def owned_scratch(parent: Path, prefix: str) -> Path:
    """Like ``locked_scratch``, for a folder that lives until the process exits: its lock is
    held until then, and the folder is removed at exit (a kill -9 leaves it to the next sweep)."""
    import atexit
    cm = locked_scratch(parent, prefix)
    folder = cm.__enter__()
    _HELD.append(cm)
    atexit.register(lambda: (shutil.rmtree(folder, ignore_errors=True), cm.__exit__(None, None, None)))
    return folder
