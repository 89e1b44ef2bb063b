"""Export a stack as a full model: the base dequantized, every loaded adapter merged into it,
saved as safetensors that ``AutoModelForCausalLM.from_pretrained`` loads, and measured
against the stack first (max and mean absolute logit difference).

    export_loaded(stack, "exports/flip", dtype="float32")
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapterkit import quant
from adapterkit.artifact import atomic_dir, portable, seal
from adapterkit.base import resolve_base
from adapterkit.errors import AdapterkitError
from adapterkit.registry import Registry
from adapterkit.safety import check_output_dir
from adapterkit.stack import LoadedStack, heldout_prompts, load_key, logit_gap, prompt_logits


@torch.no_grad()
def dense_copy(loaded: LoadedStack, dtype: torch.dtype = torch.float32):
    """The base as it computes when quantized (each 4-bit weight dequantized) plus the sum of
    the loaded adapters' deltas, as a plain transformers model. Merging into the 4-bit base
    instead would re-quantize W + BA and lose the adapters' small updates."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    s = loaded.section
    dense = AutoModelForCausalLM.from_pretrained(
        resolve_base(s.name), revision=s.revision, dtype=torch.float32, use_safetensors=True,
        trust_remote_code=s.trust_remote_code)
    targets = dict(dense.named_modules())
    for name, module in loaded.model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            w = quant.dequantized_weight(module.get_base_layer(), torch.float32)  # (out, in)
            for a in loaded.names:
                if a in module.lora_A:
                    w = w + module.get_delta_weight(a).float()
        elif quant.is_quantized_linear(module) and not name.endswith(".base_layer"):
            w = quant.dequantized_weight(module, torch.float32)
        else:
            continue
        targets[name].weight.data = w.to(targets[name].weight.device)
    return dense.to(dtype).eval()


@dataclass
class ExportReport:
    out: str
    dtype: str
    max_logit_diff: float
    mean_logit_diff: float
    prompts: int
    prompt_source: str = "generic prompts"  # where the measuring prompts came from

    def to_dict(self) -> dict:
        return asdict(self)


def export_loaded(loaded: LoadedStack, out: str | Path, dtype: str = "float32",
                  prompts: list | None = None, name: str | None = None, prompt_source: str | None = None) -> ExportReport:
    """Save base + stack as a full model (safetensors) + tokenizer + card that
    ``AutoModelForCausalLM.from_pretrained`` loads; measured against the stack first."""
    from adapterkit.cards import card_license, export_card
    if dtype not in ("float32", "bfloat16"):
        raise AdapterkitError(f"export dtype {dtype!r}: choose float32 or bfloat16")
    if prompts is None:
        prompts, prompt_source = heldout_prompts(loaded.entries)
    stacked = prompt_logits(loaded.model, loaded.tokenizer, prompts, loaded.names)
    dense = dense_copy(loaded, quant.DTYPES[dtype])
    gap = logit_gap(stacked, prompt_logits(dense, loaded.tokenizer, prompts))
    report = ExportReport(str(Path(out).resolve()), dtype, prompts=len(prompts),
                          prompt_source=prompt_source or "given prompts", **gap)
    first = loaded.entries[0].manifest
    manifest = {"kind": "export", "name": name, "stage": "export", "dtype": dtype, "base": first.get("base"),
                "recipe": {"output": {"license": card_license(first)}},
                "sources": [{"ref": e.ref, "sha256": e.weights_sha256} for e in loaded.entries],
                "report": {**report.to_dict(), "out": Path(out).name}}
    with atomic_dir(out) as tmp:
        dense.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        manifest = portable(manifest, Path(out).resolve())
        (tmp / "README.md").write_text(export_card(manifest))
        seal(tmp, manifest)
    return report


def export_profile(name: str, out: str | Path, dtype: str = "float32", registry: Registry | None = None,
                   force: bool = False, overwrite: bool = False, prompts_file: str | None = None,
                   alone: bool = False) -> ExportReport:
    """Export a profile (or an adapter ref with its parents; ``alone``: by itself) as a full model
    at ``out``; an ``out`` holding anything but an earlier export of this profile is refused
    (unless ``overwrite``) before anything loads."""
    from adapterkit.profiles import resolve_key
    registry = registry or Registry.open()
    resolve_key(registry, name, alone)  # an unknown name or a missing parent fails before loading
    check_output_dir(out, name=name, stage="export", overwrite=overwrite, key="--out")
    loaded, _, _ = load_key(name, registry, force=force, alone=alone)
    prompts, source = heldout_prompts(loaded.entries, prompts_file)
    return export_loaded(loaded, out, dtype, prompts=prompts, name=name, prompt_source=source)


