"""The Python API (``import adapterkit as ak``), end to end on the tiny default: the same code
paths as the commands, each name documented with an example."""
from __future__ import annotations

import importlib.metadata

import pytest

import adapterkit as ak


def test_version_and_documented_names():
    assert ak.__version__ == importlib.metadata.version("adapterkit")
    for name in ("load_config", "train", "generate"):
        doc = getattr(ak, name).__doc__
        assert doc and "Example" in doc, name
    assert ak.Registry.__doc__ and ak.load_stack.__doc__
    assert {"load_config", "train", "Registry", "load_stack", "generate"} <= set(dir(ak))
    with pytest.raises(AttributeError):
        ak.nothing_here  # noqa: B018


def test_train_publish_load_and_generate(tiny_dir, tmp_path):
    config = ak.load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'sft'}", "train.max_steps=3",
                                                "data.eval=null", "train.progress=false"])
    record = ak.train("sft", config)
    assert isinstance(record, ak.AdapterRecord) and record.metrics["steps"] == 3
    again = ak.train("sft", "tiny_sft", [f"output.dir={tmp_path / 'sft2'}", "train.max_steps=3",
                                         "data.eval=null", "train.progress=false"])  # a recipe + overrides
    assert again.metrics["train_loss"] == record.metrics["train_loss"]  # same seed, same run
    registry = ak.Registry.open(tmp_path / "adapters")
    registry.publish(record.path, name="api-sft", domain="flip")
    stack = ak.load_stack(["api-sft"], registry=registry)
    by_stack = ak.generate(stack, ["flip: hot up"], max_new_tokens=4)
    by_ref = ak.generate("api-sft", ["flip: hot up"], registry=registry, max_new_tokens=4)
    assert by_stack == by_ref and isinstance(by_ref[0], str)
    with pytest.raises(ak.AdapterkitError):
        ak.train("sft", "tiny_sft", ["train.learning_rat=1"])
