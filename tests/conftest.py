"""Shared fixtures: the tiny base and task, built once per session from config, offline.

ADAPTERKIT_HOME points at a session temp folder, so nothing outside it is read or written.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
if "OMP_NUM_THREADS" not in os.environ:  # CI's 2 cores; respect an explicit setting
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_runtest_logreport(report):
    """``ADAPTERKIT_FAILURES=FILE``: each failure's reason appended to FILE as it happens, by
    the process that ran the test (benchmarks/gpu.sh sets it: a run cut off at a time limit
    keeps the reasons it found so far)."""
    path = os.environ.get("ADAPTERKIT_FAILURES")
    if path and report.failed and getattr(report, "node", None) is None:  # xdist's controller: a copy
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


@pytest.fixture(scope="session")
def ak_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("adapterkit-home")
    old = os.environ.get("ADAPTERKIT_HOME")
    os.environ["ADAPTERKIT_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("ADAPTERKIT_HOME", None)
    else:
        os.environ["ADAPTERKIT_HOME"] = old


@pytest.fixture(scope="session")
def tiny_dir(ak_home):
    """The embedded default, built once: ``base/`` and ``data/``."""
    from adapterkit.tiny import ensure_tiny
    return ensure_tiny()


@pytest.fixture(scope="session")
def sft_adapter(tiny_dir, tmp_path_factory):
    """An SFT adapter on the 4-bit tiny base, trained with the shipped recipe."""
    from adapterkit.config import load_config
    from adapterkit.stages.sft import train_sft
    out = tmp_path_factory.mktemp("sft") / "adapter"
    config = load_config("sft", "tiny_sft", [f"output.dir={out}", "train.progress=false"])
    return train_sft(config)


@pytest.fixture(scope="session")
def reward_adapter(tiny_dir, tmp_path_factory):
    """A reward adapter (LoRA + score head) on the 4-bit tiny base, from the shipped recipe."""
    from adapterkit.config import load_config
    from adapterkit.stages.reward import train_reward
    out = tmp_path_factory.mktemp("reward") / "adapter"
    return train_reward(load_config("reward", "tiny_reward", [f"output.dir={out}", "train.progress=false"]))


def load_jsonl(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
