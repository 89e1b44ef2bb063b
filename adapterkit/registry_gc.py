"""Garbage collection of a registry: remove what crashed or killed publishes left behind, and
nothing else (see the protocol in ``registry.py``)."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from adapterkit.artifact import read_manifest
from adapterkit.errors import AdapterkitError
from adapterkit.refs import NAME_RE
from adapterkit.registry import TMP, Registry, rmdir_if_empty


def gc(registry: Registry, dry_run: bool = False) -> list[str]:
    """Delete what crashed or killed publishes left, and nothing else: unowned staging
    folders in ``.tmp``, and version folders ``<name>/<N>`` with no index row that the
    registry made (the name has rows, or the folder's manifest was stamped with that very
    name and version). Returns the paths removed (with ``dry_run``: that would be)."""
    registry.require()
    removed = _gc_staging(registry, dry_run)
    with registry.transaction() as db:  # holding the lock: no publisher is between rename and commit
        rows = {(r[0], r[1]) for r in db.execute("SELECT name, version FROM entries")}
        names = {name for name, _ in rows}
        orphans = [d for d in sorted(registry.root.glob("*/*")) if _orphan_version(d, rows, names)]
        removed += [str(d) for d in orphans]
        if not dry_run:
            for d in orphans:
                shutil.rmtree(d)
            for name in names | {d.parent.name for d in orphans}:
                rmdir_if_empty(registry.root / name)
    return removed


def _orphan_version(d: Path, rows: set, names: set) -> bool:
    """A version folder this registry made whose publish never committed."""
    name, version = d.parent.name, _as_int(d.name)
    if (version is None or d.is_symlink() or not d.is_dir() or name.startswith(".")
            or not NAME_RE.match(name) or (name, version) in rows):
        return False
    if name in names:
        return True
    try:
        stamped = read_manifest(d)
    except AdapterkitError:
        return False
    return stamped.get("name") == name and stamped.get("version") == version


def _gc_staging(registry: Registry, dry_run: bool = False) -> list[str]:
    removed = []
    tmp_root = registry.root / TMP
    if not tmp_root.is_dir():
        return removed
    for lock_path in tmp_root.glob("*.lock"):
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live publisher holds it
            removed.append(str(tmp_root / lock_path.stem))
            if not dry_run:
                shutil.rmtree(tmp_root / lock_path.stem, ignore_errors=True)
                os.unlink(lock_path)
    for d in tmp_root.iterdir():  # a staging dir with no lock file has no owner
        if d.is_dir() and not (tmp_root / f"{d.name}.lock").exists() and str(d) not in removed:
            removed.append(str(d))
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
    return removed


def _as_int(text: str) -> int | None:
    return int(text) if text.isdigit() and str(int(text)) == text else None
