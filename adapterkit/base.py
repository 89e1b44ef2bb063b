"""Load a base (quantized or not), fingerprint it, and attach or load adapters on it."""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterkit import quant
from adapterkit.config import BaseSection
from adapterkit.errors import AdapterkitError, CompatibilityError, DataError

log = logging.getLogger("adapterkit")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_base(name: str) -> str:
    """``tiny`` -> the cached embedded base; a local directory stays; else a hub name."""
    if name == "tiny":
        from adapterkit.tiny import ensure_tiny
        return str(ensure_tiny() / "base")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AdapterkitError(f"base {name!r}: no such directory")
    return name


@contextmanager
def loading(what: str, name: str):
    """Turn transformers' errors for a base that cannot be read (no such folder, not on the hub
    or not cached while offline, an unknown architecture without trust_remote_code, a
    truncated file) into one line naming the base."""
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterkitError(f"base {name!r}: cannot load its {what} ({first[:300]})") from None


def load_tokenizer(section: BaseSection):
    from transformers import AutoTokenizer
    source = resolve_base(section.name)
    with loading("tokenizer", section.name):
        tok = AutoTokenizer.from_pretrained(source, revision=section.revision,
                                            trust_remote_code=section.trust_remote_code)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Reuse an existing non-EOS special token (no new embedding rows, so adapters stay
        # portable); refuse when there is none.
        spare = [t for t in (tok.unk_token, *getattr(tok, "all_special_tokens", []))
                 if t is not None and t not in (tok.eos_token, tok.bos_token)]
        if not spare:
            from adapterkit.data import check_chat_contract
            check_chat_contract(tok, source)
        tok.pad_token = spare[0]
    return tok


def release_freed_memory(device) -> None:
    """On CPU, collect garbage and hand freed heap pages back to the OS: after loading, the
    full-precision tensors read while quantizing (glibc keeps freed pages otherwise). Not
    called per training step: with ``quant.reuse_dequant_buffer`` a step's peak RSS is the
    same without it (311M PPO, 14 steps: 1591 MB), and each call cost 0.3-0.4 s."""
    if torch.device(device).type != "cpu":
        return
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass


def load_model(section: BaseSection, device: str | None = None, num_labels: int | None = None):
    """The base causal LM, quantized as the section says, on CUDA when present, in the
    section's compute dtype as resolved for that device (``quant.resolve_dtype``).

    ``num_labels`` loads it as a sequence classifier instead (a reward model: 1)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    device = device or default_device()
    dtype = quant.resolve_dtype(section.compute_dtype, device)
    qconfig = quant.bnb_config(section.quantization, dtype, section.double_quant)
    auto, extra = ((AutoModelForCausalLM, {}) if num_labels is None
                   else (AutoModelForSequenceClassification, {"num_labels": num_labels}))
    with loading("weights", section.name):
        model = auto.from_pretrained(
            resolve_base(section.name), revision=section.revision, quantization_config=qconfig, **extra,
            dtype=dtype, device_map={"": device},
            trust_remote_code=section.trust_remote_code, use_safetensors=True)
    model.config.use_cache = False
    quant.keep_compute_dtype(model)  # eval computes like training (see quant.py)
    quant.reuse_dequant_buffer(model)  # CPU: one dequantization buffer, not one per call
    release_freed_memory(device)  # the full-precision tensors read while quantizing
    return model


def load_base(section: BaseSection, device: str | None = None):
    """(model, tokenizer) for a base section."""
    return load_model(section, device), load_tokenizer(section)


# -- fingerprint -----------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


ARCH_IGNORED = {"_name_or_path", "transformers_version", "quantization_config", "_commit_hash",
                "torch_dtype", "dtype", "use_cache", "architectures_version",
                # a head's labels are not the backbone's identity: a reward model (num_labels=1)
                # and the policy share one base fingerprint
                "id2label", "label2id", "num_labels", "problem_type"}


def weights_part(path: Path) -> str:
    """The weights' share of a local base's fingerprint: read from the files, nothing loaded."""
    return _sha256_json({p.name: _sha256_file(p) for p in sorted(path.glob("*.safetensors"))})


def trained_base(manifest: dict) -> BaseSection:
    """The base an adapter was trained on, from its recipe (or its manifest's base record),
    with ``trust_remote_code`` off: a manifest is someone else's file and may not choose to
    run code here; only the user's own recipe or command line can turn it on."""
    from pydantic import ValidationError
    recipe_base = (manifest.get("recipe") or {}).get("base")
    try:
        if recipe_base:
            section = BaseSection.model_validate(recipe_base)
        else:
            b = manifest["base"]
            section = BaseSection(name=b["source"], quantization=b.get("quantization", "nf4"),
                                  compute_dtype=b.get("compute_dtype", "float32"))
    except (ValidationError, KeyError, TypeError) as err:
        raise CompatibilityError(f"{manifest.get('name')}: its manifest does not name a usable base "
                                 f"({str(err).splitlines()[0]})") from None
    return section.model_copy(update={"trust_remote_code": False})


def check_base_on_disk(section: BaseSection, expected: dict, who: str) -> None:
    """Before any of a base's code or weights load: a local base's safetensors files must hash
    to the fingerprint the adapter was trained on. A mismatch is refused here, so a manifest
    that names some other folder never gets its model built."""
    path = Path(resolve_base(section.name))
    recorded = (expected or {}).get("weights")
    if not path.is_dir() or recorded is None:
        return  # a hub base: its revision is only known once loaded; checked after, as before
    if weights_part(path) != recorded:
        raise CompatibilityError(f"{who}: trained on base {expected.get('id')}, but the weights in "
                                 f"{path} are not that base's; refusing to load it")


def fingerprint(model, tokenizer) -> dict:
    """Architecture config, tokenizer vocabulary and weights identity, hashed together.

    Weights: the sha256 of every safetensors file of a local base, or the hub revision of
    a downloaded one. Quantization is recorded beside it, not in it: an adapter trained on
    nf4 can be stacked on a bf16 copy of the same base (with a warning)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ARCH_IGNORED}
    source = model.config._name_or_path
    path = Path(source)
    if path.is_dir():
        weights = weights_part(path)
    else:
        weights = _sha256_json({"hub_revision": getattr(model.config, "_commit_hash", None) or "unknown"})
    parts = {"config": _sha256_json(config), "tokenizer": _sha256_json(sorted(tokenizer.get_vocab().items())),
             "weights": weights}
    return {"id": _sha256_json(parts)[:16], **parts, "source": source}


# -- adapters on a base ----------------------------------------------------------------------

@dataclass
class Stack:
    """A base with named adapters: ``active`` are summed in order; ``trainable`` learn."""
    model: object  # peft.PeftModel
    tokenizer: object
    active: list[str]
    trainable: list[str]


def adapter_names(model) -> list[str]:
    return list(getattr(model, "peft_config", {}))


def activate(model, active: list[str], trainable: list[str] = ()) -> None:
    """Switch on several LoRA adapters at once; only ``trainable`` ones get gradients."""
    model.base_model.set_adapter(active if len(active) > 1 else active[0])
    for name, param in model.named_parameters():
        if ".lora_" in name or "modules_to_save" in name:
            param.requires_grad = any(f".{a}." in name or name.endswith(f".{a}") for a in trainable)


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


@contextmanager
def use_adapters(model, active: list[str]):
    """Run with only ``active`` adapters switched on (none: the bare base), then switch back.

    Which parameters train is left as it was: peft's ``set_adapter`` marks the adapters it
    switches on as trainable, so every ``requires_grad`` flag is saved and restored."""
    previous = list(model.base_model.active_adapters)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if active:
            model.base_model.set_adapter(list(active), inference_mode=True)
            yield
        else:
            with model.disable_adapter():
                yield
    finally:
        model.base_model.set_adapter(previous)
        for name, p in model.named_parameters():
            p.requires_grad = grads[name]


def save_adapter(model, name: str, out: Path) -> None:
    """Only adapter ``name``'s files, in PEFT's root layout (peft saves an adapter not named
    ``default`` in a sub-folder), into the existing folder ``out``."""
    import shutil
    import tempfile
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}-"))  # inside: goes with ``out``
    try:
        model.save_pretrained(str(scratch), selected_adapters=[name], safe_serialization=True)
        inner = scratch / name if (scratch / name).is_dir() else scratch
        for f in inner.iterdir():
            if f.name != "README.md":  # peft's stub card; the artifact writes its own
                shutil.move(str(f), out / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


POLICY_STAGES = ("sft", "dpo", "ppo", "merge")  # causal-LM adapters a policy can stack on
REWARD_STAGES = ("reward",)


def checked_adapter(ref: str | Path, stages: tuple[str, ...], role: str,
                    registry: str | Path | None = None) -> tuple[Path, dict]:
    """(directory, manifest) of an adapter given by path or registry ref, verified before
    anything loads it: PEFT files and safetensors weights present, every file against the
    manifest's sha256 (paths kept inside), and a stage that fits ``role``."""
    from adapterkit.artifact import read_manifest, verify_files
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


def parent_entry(adapter_dir: str | Path, base_fp: dict, stages: tuple[str, ...] = POLICY_STAGES,
                 role: str = "parent") -> dict:
    """The manifest's record of one parent adapter (a directory or a registry reference),
    verified (``checked_adapter``); refuses one trained on another base."""
    d, manifest = checked_adapter(adapter_dir, stages, role)
    trained_on = (manifest.get("base") or {}).get("fingerprint", {}).get("id")
    if trained_on != base_fp["id"]:
        raise CompatibilityError(f"{adapter_dir}: trained on base {trained_on} "
                                 f"({(manifest.get('base') or {}).get('source')}), not on this base {base_fp['id']}")
    return {"path": str(d), "name": manifest.get("name", d.name),
            "sha256": _sha256_file(d / "adapter_model.safetensors"), "base_fingerprint": trained_on}


def load_parent_stack(model, parent_dirs: list[str | Path], base_fp: dict):
    """Frozen parent adapters (bottom first) as ``parent0, parent1, ...`` on a base.

    Returns (model, adapter names, the manifest's ``parent`` entries); with no parents the
    model comes back as it was."""
    entries = [parent_entry(d, base_fp) for d in parent_dirs]
    names = [f"parent{i}" for i in range(len(entries))]
    if entries:
        model, names = load_adapters(model, [e["path"] for e in entries], names)
    return model, names, entries
