"""The only module that touches bitsandbytes: QuantConfig -> BitsAndBytesConfig, dequantize."""
from __future__ import annotations

import logging

import torch

# bitsandbytes' CPU backend tries to fetch an optional kernel from the hub and logs a
# warning when it cannot; adapterkit never downloads at run time, so that line is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from transformers import BitsAndBytesConfig  # noqa: E402  (after the logger is quieted)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_config(quantization: str, compute_dtype: str = "float32",
               double_quant: bool = True) -> BitsAndBytesConfig | None:
    """nf4: 4-bit NormalFloat with double quantization (QLoRA); int8: LLM.int8(); none."""
    if quantization == "none":
        return None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[compute_dtype])
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}")


def is_quantized_linear(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a quantized linear layer really computes with, as a dense tensor."""
    import bitsandbytes as bnb
    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(module.weight.data, state).to(dtype)
        w = bnb.functional.dequantize_4bit(module.weight.data, state)
        return w.to(dtype)
    if isinstance(module, bnb.nn.Linear8bitLt):
        state = module.state
        cb = module.weight.data if state.CB is None else state.CB
        scb = module.weight.SCB if state.SCB is None else state.SCB
        return (cb.float() * scb.float().unsqueeze(1) / 127.0).to(dtype)
    return module.weight.data.to(dtype)


def _dequantize_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """Undo bitsandbytes' CPU inference layout (``packing_format_for_cpu``): (N, K/2) uint8
    in blocks of 32 rows, absmax (K/blocksize, N) in bf16 -> the dense (N, K) weight."""
    n, k = state.shape
    pairs = packed.reshape(-1, 32)  # low nibbles hold the first 32 codes, high the next 32
    codes = torch.cat([pairs & 0xF, pairs >> 4], dim=-1)  # (N*K/64, 64)
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k).long()  # (N, K)
    absmax = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # (N, K)
    return state.code.float().to(packed.device)[codes] * absmax


def keep_compute_dtype(model: torch.nn.Module) -> int:
    """Make 4-bit layers compute in eval mode as they do in training; returns how many changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight on its first
    eval-mode forward and from then on computes in bf16 with a bf16 absmax, whatever
    ``bnb_4bit_compute_dtype`` says. Logits then differ from training's (dequantize, then
    matmul in the compute dtype) by ~1e-2, and a merge or export cannot be checked against
    them. This switches that path off for fp32 layers (layers already repacked are unpacked,
    keeping the bf16-rounded absmax)."""
    import bitsandbytes as bnb
    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse"):
        return 0  # a bitsandbytes without the CPU repacking: nothing to undo
    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.compute_dtype not in (None, torch.float32):
            continue
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = \
                bnb.functional._convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        changed += 1
    return changed
