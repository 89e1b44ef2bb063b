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
from adapterkit.artifact import atomic_dir, seal
from adapterkit.base import resolve_base
from adapterkit.errors import AdapterkitError
from adapterkit.registry import Registry
from adapterkit.safety import check_output_dir
from adapterkit.stack import DEFAULT_PROMPTS, LoadedStack, load_profile, logit_gap, prompt_logits


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

    def to_dict(self) -> dict:
        return asdict(self)


def export_loaded(loaded: LoadedStack, out: str | Path, dtype: str = "float32",
                  prompts: list | None = None, name: str | None = None) -> ExportReport:
    """Save base + stack as a full model (safetensors) + tokenizer that
    ``AutoModelForCausalLM.from_pretrained`` loads; measured against the stack first."""
    if dtype not in ("float32", "bfloat16"):
        raise AdapterkitError(f"export dtype {dtype!r}: choose float32 or bfloat16")
    prompts = prompts or DEFAULT_PROMPTS
    stacked = prompt_logits(loaded.model, loaded.tokenizer, prompts, loaded.names)
    dense = dense_copy(loaded, quant.DTYPES[dtype])
    gap = logit_gap(stacked, prompt_logits(dense, loaded.tokenizer, prompts))
    report = ExportReport(str(Path(out).resolve()), dtype, prompts=len(prompts), **gap)
    with atomic_dir(out) as tmp:
        dense.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        seal(tmp, {"kind": "export", "name": name, "stage": "export", "dtype": dtype, "base": loaded.entries[0].manifest.get("base"),
                   "sources": [{"ref": e.ref, "sha256": e.weights_sha256} for e in loaded.entries],
                   "report": report.to_dict()})
    return report


def export_profile(name: str, out: str | Path, dtype: str = "float32", registry: Registry | None = None,
                   force: bool = False, overwrite: bool = False) -> ExportReport:
    """Export a profile as a full model at ``out``; an ``out`` holding anything but an earlier
    export of this profile is refused (unless ``overwrite``) before anything loads."""
    check_output_dir(out, name=name, stage="export", overwrite=overwrite, key="--out")
    loaded, _ = load_profile(name, registry, force=force)
    return export_loaded(loaded, out, dtype, name=name)


