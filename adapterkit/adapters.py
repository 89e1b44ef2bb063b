"""Named LoRA adapters on one base: find and verify them, load and save them, and switch them.

``activate`` is the one adapter switch (``use_adapters`` is it, undone on exit): every role of
every stage (policy, reference, reward, value, a served stack) is a list of adapter names.
Registry references are resolved here, above ``base.py``, which knows nothing of the store.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from adapterkit.artifact import read_manifest, sha256_file, verify_files
from adapterkit.errors import CompatibilityError, DataError

POLICY_STAGES = ("sft", "dpo", "ppo", "merge")  # causal-LM adapters a policy can stack on
REWARD_STAGES = ("reward",)


# -- switching ---------------------------------------------------------------------------------

def activate(model, active: list[str], trainable: tuple[str, ...] | list[str] = ()) -> None:
    """Switch on exactly ``active`` (summed in order; ``[]``: the bare base); only the weights of
    the ``trainable`` adapters get gradients (peft's ``set_adapter`` would mark every active one)."""
    model.base_model.set_adapter(list(active))
    for name, param in model.named_parameters():
        if ".lora_" in name or "modules_to_save" in name:
            param.requires_grad = any(f".{a}." in name or name.endswith(f".{a}") for a in trainable)


@contextmanager
def use_adapters(model, active: list[str]):
    """Run with only ``active`` adapters switched on (none: the bare base), then switch back.

    Which parameters train is left as it was: every ``requires_grad`` flag is saved and restored."""
    previous = list(model.base_model.active_adapters)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if active:
            activate(model, active)
            yield
        else:
            with model.disable_adapter():
                yield
    finally:
        model.base_model.set_adapter(previous)
        for name, p in model.named_parameters():
            p.requires_grad = grads[name]


# -- loading and saving --------------------------------------------------------------------------

def load_adapters(model, adapter_dirs: list[str | Path], names: list[str] | None = None):
    """Load adapter directories onto a base (frozen); returns the PeftModel and names."""
    from peft import PeftModel
    names = names or [f"a{i}" for i in range(len(adapter_dirs))]
    for name, d in zip(names, adapter_dirs):
        if not (Path(d) / "adapter_config.json").is_file():
            raise DataError(f"{d}: not an adapter directory (no adapter_config.json)")
        if isinstance(model, PeftModel):
            model.load_adapter(str(d), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(d), adapter_name=name, is_trainable=False)
    return model, names


def save_adapter(model, name: str, out: Path) -> None:
    """Only adapter ``name``'s files, in PEFT's root layout (peft saves an adapter not named
    ``default`` in a sub-folder), into the existing folder ``out``."""
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}-"))  # inside: goes with ``out``
    try:
        model.save_pretrained(str(scratch), selected_adapters=[name], safe_serialization=True)
        inner = scratch / name if (scratch / name).is_dir() else scratch
        for f in inner.iterdir():
            if f.name != "README.md":  # peft's stub card; the artifact writes its own
                shutil.move(str(f), out / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- finding and checking ------------------------------------------------------------------------

def resolve_adapter(ref: str | Path, registry: str | Path | None = None) -> Path:
    """An adapter directory, or a registry reference (``name``, ``name@3``) resolved to its
    verified directory. An absent registry is not created."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    from adapterkit.registry import INDEX, Registry, default_root
    root = Path(registry).expanduser() if registry is not None else default_root()
    if "/" in str(ref) or not (root / INDEX).is_file():
        raise DataError(f"{ref}: no such adapter directory (nor a registry entry: no registry at {root})")
    return Registry.open(root).path(str(ref))


def checked_adapter(ref: str | Path, stages: tuple[str, ...], role: str,
                    registry: str | Path | None = None) -> tuple[Path, dict]:
    """(directory, manifest) of an adapter given by path or registry ref, verified before
    anything loads it: PEFT files and safetensors weights present, every file against the
    manifest's sha256 (paths kept inside), and a stage that fits ``role``."""
    d = resolve_adapter(ref, registry)
    if not (d / "adapter_config.json").is_file() or not (d / "adapter_model.safetensors").is_file():
        raise DataError(f"{ref}: not an adapter directory (needs adapter_config.json and "
                        "adapter_model.safetensors; adapter_model.bin is pickle and not loaded)")
    manifest = read_manifest(d)  # no manifest: nothing to check it against, so refused
    verify_files(d, manifest)
    stage = manifest.get("stage")
    if stage not in stages:
        raise CompatibilityError(f"{ref}: a {stage} adapter cannot be the {role}; it needs a "
                                 f"{' / '.join(stages)} adapter")
    return d, manifest


def parent_record(adapter_dir: str | Path, base_fp: dict, stages: tuple[str, ...] = POLICY_STAGES,
                  role: str = "parent") -> dict:
    """The manifest's record (a dict) of one parent adapter (a directory or a registry
    reference), verified (``checked_adapter``); refuses one trained on another base. The record
    names the parent by identity: its sha256, its manifest name and, when it is a registry
    entry, its ``ref`` (``name@version``); ``path`` is made relative to the artifact on save."""
    d, manifest = checked_adapter(adapter_dir, stages, role)
    trained_on = (manifest.get("base") or {}).get("fingerprint", {}).get("id")
    if trained_on != base_fp["id"]:
        raise CompatibilityError(f"{adapter_dir}: trained on base {trained_on} "
                                 f"({(manifest.get('base') or {}).get('source')}), not on this base {base_fp['id']}")
    return {"path": str(d), "name": manifest.get("name", d.name), "ref": registry_ref(d, manifest),
            "sha256": sha256_file(d / "adapter_model.safetensors"), "base_fingerprint": trained_on}


def registry_ref(folder: Path, manifest: dict) -> str | None:
    """``name@version`` when ``folder`` is a registry's version folder (``<root>/<name>/<N>``,
    stamped with that name and version), else None: lineage is recorded by identity."""
    from adapterkit.registry import INDEX
    folder = Path(folder).resolve()
    if (folder.parent.parent / INDEX).is_file() and manifest.get("name") == folder.parent.name \
            and str(manifest.get("version")) == folder.name:
        return f"{folder.parent.name}@{folder.name}"
    return None


def load_parent_stack(model, parent_dirs: list[str | Path], base_fp: dict):
    """Frozen parent adapters (bottom first) as ``parent0, parent1, ...`` on a base.

    Returns (model, adapter names, the manifest's ``parent`` records); with no parents the
    model comes back as it was."""
    records = [parent_record(d, base_fp) for d in parent_dirs]
    names = [f"parent{i}" for i in range(len(records))]
    if records:
        model, names = load_adapters(model, [r["path"] for r in records], names)
    return model, names, records


def lora_config(config, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig from a stage config's ``lora`` section (every stage's new adapters)."""
    from peft import LoraConfig
    lo = config.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout,
                      target_modules=lo.target_modules, task_type=task_type, bias="none")
