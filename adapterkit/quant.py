"""The only module that uses bitsandbytes: QuantConfig -> BitsAndBytesConfig, dequantize,
and the CPU 4-bit matmul that reuses one dequantization buffer. Its private names (the CPU
layout, the native kernels) are reached through ``_compat.py``."""
from __future__ import annotations

import functools
import logging
import threading

import torch

from adapterkit import _compat

# bitsandbytes' CPU backend tries to fetch an optional kernel from the hub and logs a
# warning when it cannot; adapterkit never downloads at run time, so that line is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from transformers import BitsAndBytesConfig  # noqa: E402  (after the logger is quieted)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(name: str, device) -> torch.dtype:
    """``base.compute_dtype`` as the dtype the base computes in on ``device``; the one place
    ``auto`` is decided. auto: bf16 on a CUDA card that supports it (Ampere and later), fp16
    on an older one, fp32 anywhere else (CPU: bnb's 4-bit CPU kernels and the tests' exact
    comparisons are fp32)."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type != "cuda":
        return torch.float32
    # not counting emulation: torch reports bf16 on a T4 (sm_75), where it is emulated and slow
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def storage_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """``base.quant_storage`` resolved: auto is the compute dtype when ``accelerate launch``
    shards the parameters (FSDP, ZeRO-3: they shard float tensors of the model's one dtype),
    else uint8 (bitsandbytes' default)."""
    from adapterkit.distributed import sharded
    if name != "auto":
        return torch.uint8 if name == "uint8" else DTYPES[name]
    return compute_dtype if sharded() else torch.uint8


def bnb_config(quantization: str, compute_dtype: torch.dtype = torch.float32,
               double_quant: bool = True, quant_storage: torch.dtype = torch.uint8) -> BitsAndBytesConfig | None:
    """nf4: 4-bit NormalFloat with double quantization (QLoRA); int8: LLM.int8(); none.
    ``compute_dtype``: a resolved dtype (``resolve_dtype``), never ``auto``; ``quant_storage``:
    the packed weights' dtype (``storage_dtype``)."""
    if quantization == "none":
        return None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)
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
        if _compat.cpu_packed(state):
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
    keeping the bf16-rounded absmax). Layers on a GPU are left alone: the repacking is CPU-only."""
    import bitsandbytes as bnb
    if not _compat.has_cpu_repacking():
        return 0  # a bitsandbytes without the CPU repacking: nothing to undo
    changed = 0
    for module in model.modules():
        if (not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu"
                or module.compute_dtype not in (None, torch.float32)):
            continue
        _compat.no_cpu_repacking(module)
        state = module.weight.quant_state
        if _compat.cpu_packed(state):
            module.weight.data, module.weight.quant_state = _compat.unpack_cpu_weight(module.weight.data, state)
        changed += 1
    return changed


# -- CPU: dequantize every 4-bit layer into one reused buffer ----------------------------------
#
# bitsandbytes' CPU matmul dequantizes the layer's weight into a fresh tensor on every forward
# and again in backward, then frees it. Those buffers (the largest allocations in a step) make
# glibc fault in new pages each time and fragment the heap around the activations that
# training keeps. Measured on a 311M Llama, PPO micro-batch of 4 on 2 cores: dequantization
# took 4.1 ms per layer call in training against 0.8 ms when the memory was warm. Layers
# converted by ``reuse_dequant_buffer`` write the same dequantized weight (bnb's own kernel)
# into one buffer per thread instead: the result is bit-identical (tests/test_quant.py).

_C_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_scratch = threading.local()


@functools.cache
def _cpu_kernel(quant_type: str, dtype: torch.dtype):
    """bitsandbytes' native CPU dequantizer for (quant_type, dtype), or None (looked up once:
    every layer call uses it)."""
    return _compat.cpu_dequantize_kernel(quant_type, _C_DTYPE[dtype])


def _dequantize_into_buffer(weight, dtype: torch.dtype) -> torch.Tensor:
    """The layer's dense weight (N, K) in ``dtype``, written into this thread's buffer (valid
    until the next call: callers use it at once)."""
    import ctypes
    import bitsandbytes as bnb
    state = weight.quant_state
    n, k = state.shape
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n * k or buf.dtype != dtype:
        buf = _scratch.buf = torch.empty(n * k, dtype=dtype, device="cpu")  # the CPU kernel writes it through ctypes
    absmax = state.absmax
    if state.nested:  # double quantization: the absmax are themselves 8-bit
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float().contiguous()
    packed = weight.data.view(torch.uint8)
    _cpu_kernel(state.quant_type, dtype)(
        ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(buf.data_ptr()), ctypes.c_longlong(state.blocksize),
        ctypes.c_longlong(n), ctypes.c_longlong(k))
    return buf[:n * k].view(n, k)


class _BufferedMatmul4bit(torch.autograd.Function):
    """x W^T for a frozen 4-bit W, dequantized into the buffer in x's dtype in forward and
    again in backward. x (..., K) -> (..., N)"""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return torch.nn.functional.linear(x, _dequantize_into_buffer(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad):  # (..., N) @ (N, K) -> (..., K); the frozen weight gets none
        return grad @ _dequantize_into_buffer(ctx.weight, grad.dtype), None


@functools.cache
def _buffered_class():
    import bitsandbytes as bnb

    class BufferedLinear4bit(bnb.nn.Linear4bit):
        """A Linear4bit whose CPU matmul reuses one dequantization buffer (see above)."""

        def forward(self, x):
            if x.device.type != "cpu":
                return super().forward(x)
            _compat.fix_quant_state(self)
            out = _BufferedMatmul4bit.apply(x.to(self.compute_dtype), self.weight)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.to(x.dtype)

    return BufferedLinear4bit


def reuse_dequant_buffer(model: torch.nn.Module) -> int:
    """Convert a CPU model's fp32-compute 4-bit layers to the buffered matmul above; returns
    how many. Layers bitsandbytes' CPU kernel does not take (odd width, blocksize >= 2048,
    the bf16 inference layout) keep the stock path."""
    import bitsandbytes as bnb
    changed = 0
    for module in model.modules():
        if type(module) is not bnb.nn.Linear4bit or module.weight.device.type != "cpu":
            continue
        state = module.weight.quant_state
        if (module.compute_dtype != torch.float32 or state is None
                or _compat.cpu_packed(state) or state.shape[-1] % 2
                or state.blocksize >= 2048 or _cpu_kernel(state.quant_type, torch.float32) is None):
            continue
        module.__class__ = _buffered_class()
        changed += 1
    return changed
