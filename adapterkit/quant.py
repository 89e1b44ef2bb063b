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
        w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        return w.to(dtype)
    if isinstance(module, bnb.nn.Linear8bitLt):
        state = module.state
        cb = module.weight.data if state.CB is None else state.CB
        scb = module.weight.SCB if state.SCB is None else state.SCB
        return (cb.float() * scb.float().unsqueeze(1) / 127.0).to(dtype)
    return module.weight.data.to(dtype)
