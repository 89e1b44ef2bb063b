"""Merge arithmetic on random tensors (litgpt style: no trained model needed), the method
records, and the checks a MergeSpec makes when it is built."""
from __future__ import annotations

import pytest
import torch

from adapterkit.errors import AdapterkitError
from adapterkit.merge import METHODS, MergeSpec, cat_lora, padded_copy, padded_lora


def random_lora(r: int, d_in: int = 12, d_out: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)  # A (r, in), B (out, r)


def test_cat_lora_is_exactly_the_scaled_sum():
    loras = [random_lora(r, seed=i) for i, r in enumerate((2, 5, 3))]
    scales = [0.5, 2.0, -1.25]
    A, B = cat_lora([a for a, _ in loras], [b for _, b in loras], scales)
    assert A.shape == (10, 12) and B.shape == (10, 10)  # ranks add up: 2 + 5 + 3
    expected = sum(s * b @ a for (a, b), s in zip(loras, scales))  # (out, in)
    torch.testing.assert_close(B @ A, expected, atol=1e-5, rtol=1e-5)
    one_A, one_B = cat_lora([loras[0][0]], [loras[0][1]], [1.0])  # one adapter: itself
    assert torch.equal(one_A, loras[0][0]) and torch.equal(one_B, loras[0][1])


def test_padded_lora_keeps_the_product_bit_for_bit():
    A, B = random_lora(3)
    A8, B8 = padded_lora(A, B, 8)
    assert A8.shape == (8, 12) and B8.shape == (10, 8)
    assert torch.equal(A8[:3], A) and torch.equal(B8[:, :3], B)
    assert not A8[3:].any() and not B8[:, 3:].any()
    assert torch.equal(B8 @ A8, B @ A)


def test_padded_copy_on_a_one_layer_model_gives_the_same_output():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = model(x)
        copy = padded_copy(model, "default", 8)
        model.base_model.set_adapter(copy)
        after = model(x)
    layer = model.base_model.model[0]
    assert layer.lora_A[copy].weight.shape == (8, 12) and layer.scaling[copy] == layer.scaling["default"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert layer.lora_A["default"].weight.shape == (3, 12)  # the source is left as it was


def test_method_records():
    assert [m for m, rec in METHODS.items() if rec.exact] == ["cat"]
    for name, rec in METHODS.items():
        assert rec.name == name and rec.paper and callable(rec.merge)
        assert set(rec.params) <= {"weights", "density", "mixed_ranks", "seed"}
    assert {m for m, rec in METHODS.items() if "density" in rec.params} == {"ties", "dare_linear", "dare_ties"}
    assert METHODS["ties"].svd_variant == "ties_svd" and METHODS["cat"].svd_variant is None


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "average"}, "unknown merge method 'average'; known: cat, linear"),
    ({"mixed_ranks": "crop"}, "mixed_ranks 'crop': choose pad or svd"),
    ({"density": 0.0}, "density 0.0"),
    ({"density": 1.5}, "density 1.5"),
])
def test_merge_spec_checks_itself(kwargs, message):
    with pytest.raises(AdapterkitError, match=message):
        MergeSpec(**kwargs)


def test_merge_weights():
    assert MergeSpec().weights_for(["a", "b"]) == [1.0, 1.0]  # the stack sums its adapters
    assert MergeSpec(weights=(0.5, 2.0)).weights_for(["a", "b"]) == [0.5, 2.0]
    with pytest.raises(AdapterkitError, match="3 merge weights for 2 adapters"):
        MergeSpec(weights=(1.0, 1.0, 1.0)).weights_for(["a", "b"])
