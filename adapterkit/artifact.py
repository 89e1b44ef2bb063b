"""The adapter artifact: PEFT's files, the ``adapterkit.json`` manifest, a model card.

Written into a temporary sibling folder and renamed into place, so a crash leaves the old
directory or the new one, never half of either.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from adapterkit.errors import AdapterkitError, IntegrityError
from adapterkit.safety import locked_scratch, member, replace_dir  # noqa: F401 (replace_dir: re-exported)

MANIFEST = "adapterkit.json"
LIBRARIES = ("adapterkit", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets",
             "safetensors", "accelerate")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """The sha256 of an object's canonical JSON (sorted keys; anything else as ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str | None]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def path_like(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or "/" in value or value == "."


def portable(obj, folder: Path):
    """``obj`` (a manifest, a recipe) with every absolute or working-directory path that exists
    on this machine rewritten relative to ``folder`` (the artifact), so nothing in an artifact
    names the machine that made it; other strings (hub ids, ``tiny:sft``, names) stay."""
    if isinstance(obj, dict):
        return {k: portable(v, folder) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, folder) for v in obj]
    if isinstance(obj, str) and path_like(obj):
        path = Path(obj).expanduser()
        if os.path.isabs(path) or path.exists():
            return os.path.relpath(path.resolve(), folder.resolve())
    return obj


def rebase(obj, old: Path, new: Path):
    """Paths relative to an artifact at ``old`` made relative to its copy at ``new``."""
    if isinstance(obj, dict):
        return {k: rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rebase(v, old, new) for v in obj]
    if isinstance(obj, str) and path_like(obj) and not os.path.isabs(obj) and (old / obj).exists():
        return os.path.relpath((old / obj).resolve(), new.resolve())
    return obj


def recorded_path(folder: Path, value: str) -> str:
    """A path a manifest recorded (relative to its artifact ``folder``) as a usable path; a
    value that is no path there (``tiny``, a hub id, ``tiny:sft``) comes back unchanged."""
    if isinstance(value, str) and path_like(value) and not os.path.isabs(value) and (folder / value).exists():
        return str((folder / value).resolve())
    return value


def portable_json(path: Path, folder: Path) -> None:
    if path.is_file():
        path.write_text(json.dumps(portable(json.loads(path.read_text()), folder), indent=2))


def portable_yaml(path: Path, folder: Path) -> None:
    """Rewrite a YAML recipe in place with ``portable`` paths (config.yaml beside an adapter)."""
    import yaml
    if path.is_file():
        path.write_text(yaml.safe_dump(portable(yaml.safe_load(path.read_text()), folder), sort_keys=False))


def write_artifact(out_dir: str | os.PathLike, write_files: Callable[[Path], None],
                   manifest: dict) -> Path:
    """Call ``write_files(tmp)``, then add manifest + card and move the folder into place; every
    path in the manifest and ``config.yaml`` is written relative to the artifact (``portable``)."""
    from adapterkit.cards import model_card
    folder = Path(out_dir).resolve()
    with atomic_dir(out_dir) as tmp:
        write_files(tmp)
        portable_yaml(tmp / "config.yaml", folder)
        portable_json(tmp / "adapter_config.json", folder)  # peft writes the base's absolute path
        manifest = {**portable(manifest, folder), "libraries": library_versions(),
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        (tmp / "README.md").write_text(model_card(manifest, [p.name for p in tmp.iterdir()]))
        seal(tmp, manifest)
    return Path(out_dir)


def seal(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` with the sha256 of every other file in ``folder``."""
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
                         if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``out`` to fill: swapped onto ``out`` when the block ends, removed
    if it raises, so ``out`` is always the old folder or the whole new one. The sibling is
    locked while this process lives; one that a killed process left is removed next time."""
    out = Path(out)
    with locked_scratch(out.parent, f".{out.name}.tmp-") as tmp:
        try:
            yield tmp
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def read_manifest(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise AdapterkitError(f"{adapter_dir}: no {MANIFEST}; not an adapterkit adapter")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path}: corrupt manifest ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path}: cannot be read ({err})") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path}: corrupt manifest (not a JSON object)")
    return manifest


def verify_files(adapter_dir: str | os.PathLike, manifest: dict | None = None) -> None:
    """Every file the manifest lists exists with the recorded sha256."""
    adapter_dir = Path(adapter_dir)
    manifest = manifest or read_manifest(adapter_dir)
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise IntegrityError(f"{adapter_dir / MANIFEST}: 'files' is not a mapping of file names to sha256")
    for name, digest in files.items():
        path = member(adapter_dir, name)
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {MANIFEST})")
        if sha256_file(path) != digest:
            raise IntegrityError(f"{path}: sha256 does not match {MANIFEST}; the file was changed or truncated")
