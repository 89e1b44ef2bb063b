"""What a trained adapter depends on, hashed into one key: a stage's ``inputs``.

    inputs = stage_inputs(config)   # {"sha256": key, "base": ..., "data": {...}, "adapters": {...}, ...}

The parts: the resolved config without what cannot change the weights or the metrics (output
folder and names, progress bar, checkpoint and tracker settings), the base's fingerprint and
chat template, the sha256 of every data file it reads (not their paths: a copy is the same
data) and of the weights of every adapter it loads (parents, a reward model). Every stage
records it in its manifest (``stages.common.base_manifest``); ``adapterkit pipeline`` computes
it before loading anything and reuses a registry entry with the same key instead of training.
"""
from __future__ import annotations

from pathlib import Path

from adapterkit import rewards
from adapterkit.artifact import sha256_file, sha256_json
from adapterkit.config import StageConfig

# Keys that cannot change what a stage trains or reports: left out of the key.
IGNORED = {"output": None, "train": ("progress", "save_steps", "save_total_limit", "checkpoint_dir",
                                      "resume_from", "report_to", "logging_dir")}
DATA_KEYS = (("data", "train"), ("data", "eval"), ("dpo", "prompts"))  # data sources, by content
ADAPTER_KEYS = ("parent", "reward")  # in the stage's own section: adapters, by their weights


def data_sha256(source: str) -> str:
    """A data source's content: a file's sha256, a folder's (every file in it), or for a hub
    dataset its name (its content is the hub's)."""
    from adapterkit.resolvers import resolve_data
    path = Path(resolve_data(source)).expanduser()
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
    return sha256_json({"hub": source})


def adapter_sha256(ref: str) -> str:
    """The weights' sha256 of an adapter given by folder or registry ref (as lineage records it)."""
    from adapterkit.adapters import resolve_adapter
    return sha256_file(resolve_adapter(ref) / "adapter_model.safetensors")


def stage_inputs(config: StageConfig, fingerprint: dict | None = None, tokenizer=None) -> dict:
    """The inputs of a stage and their key (``sha256``). ``fingerprint`` and ``tokenizer``: the
    loaded base's, when a stage has them; else read from disk without loading the weights
    (``base.disk_fingerprint``; the same values, tested)."""
    from adapterkit.base import default_device, disk_fingerprint
    from adapterkit.data import template_hash
    from adapterkit.quant import DTYPE_NAMES, resolve_dtype
    if tokenizer is None:
        from adapterkit.stages.common import load_stage_tokenizer
        tokenizer = load_stage_tokenizer(config)
    fingerprint = fingerprint or disk_fingerprint(config.base, tokenizer)
    raw = config.model_dump(mode="json")
    for section, keys in IGNORED.items():
        if keys is None:
            raw.pop(section, None)
        else:
            for key in keys:
                raw[section].pop(key, None)
    data = {}
    for section, key in DATA_KEYS:
        if (raw.get(section) or {}).get(key):
            data[f"{section}.{key}"] = data_sha256(raw[section].pop(key))
    adapters = {}
    own = raw.get(config.stage) or {}
    for key in ADAPTER_KEYS:
        value = own.get(key)
        if isinstance(value, list):
            adapters[f"{config.stage}.{key}"] = [adapter_sha256(v) for v in own.pop(key)]
        elif isinstance(value, str) and not rewards.is_function_ref(value):
            adapters[f"{config.stage}.{key}"] = adapter_sha256(own.pop(key))
    raw["base"] = {k: v for k, v in raw["base"].items() if k not in ("name", "revision")}
    raw["data"].pop("chat_template", None)  # what it sets is in the tokenizer's template hash
    parts = {"config": sha256_json(raw), "base": fingerprint["id"], "chat_template": template_hash(tokenizer),
             "compute_dtype": DTYPE_NAMES[resolve_dtype(config.base.compute_dtype, default_device())],
             "data": data, "adapters": adapters}
    return {"sha256": sha256_json(parts), **parts}


def holds(folder: Path, key: str) -> bool:
    """``folder`` is a whole adapter of the inputs ``key`` (its files match its manifest)."""
    from adapterkit.artifact import read_manifest, verify_files
    from adapterkit.errors import AdapterkitError
    try:
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
    except AdapterkitError:
        return False
    return (manifest.get("inputs") or {}).get("sha256") == key
