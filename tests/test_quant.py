"""The CPU 4-bit matmul that reuses one dequantization buffer computes what bitsandbytes does.

CPU-only by design: the model is loaded on the CPU on every machine (the buffered matmul
never applies to a GPU layer), and the test needs bitsandbytes' native CPU kernels."""
import pytest
import torch

from adapterkit.base import load_model
from adapterkit.sections import BaseSection


def quantized_linears(model):
    import bitsandbytes as bnb
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def logits_and_input_grad(model, embeds):
    """Training-mode logits and d(sum logits^2)/d(inputs_embeds): every 4-bit layer's forward
    and backward."""
    x = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    (grad,) = torch.autograd.grad(logits.square().sum(), x)
    return logits.detach(), grad


def cpu_kernel_missing() -> bool:
    from adapterkit.quant import _cpu_kernel
    return _cpu_kernel("nf4", torch.float32) is None


@pytest.mark.skipif(cpu_kernel_missing(), reason="this bitsandbytes build has no native CPU 4-bit kernel")
def test_buffered_4bit_matmul_is_bit_identical_to_bitsandbytes(tiny_dir):
    import bitsandbytes as bnb
    model = load_model(BaseSection(name=str(tiny_dir / "base")), "cpu").train()
    layers = quantized_linears(model)
    assert layers and all(type(m) is not bnb.nn.Linear4bit for m in layers)  # all converted
    assert len({tuple(m.weight.quant_state.shape) for m in layers}) > 1  # one buffer, several shapes
    torch.manual_seed(0)
    embeds = torch.randn(3, 7, model.config.hidden_size)
    ours = logits_and_input_grad(model, embeds)
    for m in layers:  # back to the stock class: bnb's own dequantize + matmul
        m.__class__ = bnb.nn.Linear4bit
    stock = logits_and_input_grad(model, embeds)
    assert torch.equal(ours[0], stock[0])
    assert torch.equal(ours[1], stock[1])
    assert ours[1].abs().sum() > 0

