"""The one adapter switch (``activate`` / ``use_adapters``) on a one-layer model, and the
resolvers a user's base, data and reward names plug into (as the tiny default does)."""
from __future__ import annotations

import json

import torch

from adapterkit import resolvers
from adapterkit.adapters import activate, use_adapters


def two_adapter_model():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 4)), config, adapter_name="x")
    model.add_adapter("y", config)
    return model


def trainable(model) -> set[str]:
    return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}


def test_activate_sums_the_active_adapters_and_trains_only_the_trainable_ones():
    model, x = two_adapter_model(), torch.randn(3, 6)
    layer = model.base_model.model[0]
    with torch.no_grad():
        base = layer.base_layer(x)
        delta = {n: layer.lora_B[n](layer.lora_A[n](x)) * layer.scaling[n] for n in ("x", "y")}
        activate(model, ["x", "y"], trainable=["y"])
        assert list(model.base_model.active_adapters) == ["x", "y"] and trainable(model) == {"y"}
        torch.testing.assert_close(model(x), base + delta["x"] + delta["y"])
        activate(model, [])  # the bare base, nothing trains
        assert trainable(model) == set()
        torch.testing.assert_close(model(x), base)


def test_use_adapters_switches_back_and_keeps_the_trainable_flags():
    model, x = two_adapter_model(), torch.randn(3, 6)
    activate(model, ["x"], trainable=["x"])
    with torch.no_grad():
        only_x = model(x)
        with use_adapters(model, ["y"]):
            assert list(model.base_model.active_adapters) == ["y"]
            assert not torch.allclose(model(x), only_x)
        with use_adapters(model, []):
            torch.testing.assert_close(model(x), model.base_model.model[0].base_layer(x))
        torch.testing.assert_close(model(x), only_x)
    assert list(model.base_model.active_adapters) == ["x"] and trainable(model) == {"x"}


def test_a_users_base_data_and_reward_names_resolve_like_tiny(tmp_path, monkeypatch):
    from adapterkit.base import resolve_base
    from adapterkit.data import read_rows
    from adapterkit.rewards import load_function
    monkeypatch.setattr(resolvers, "BASES", dict(resolvers.BASES))
    monkeypatch.setattr(resolvers, "DATA", dict(resolvers.DATA))
    monkeypatch.setattr(resolvers, "REWARDS", dict(resolvers.REWARDS))
    (tmp_path / "q3.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    resolvers.register_base("mybase", lambda name: tmp_path)
    resolvers.register_data("corp", lambda ref: tmp_path / f"{ref.split(':', 1)[1]}.jsonl")
    resolvers.register_reward("exact", "adapterkit.tiny:reward")
    assert resolve_base("mybase") == str(tmp_path)
    assert read_rows("corp:q3") == [{"prompt": "hi"}]
    from adapterkit import tiny
    assert load_function("exact") is tiny.reward
    assert resolve_base("tiny") == str(tiny.ensure_tiny() / "base")  # the embedded default, the same way
