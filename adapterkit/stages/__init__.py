"""One file per stage, each with one entry point ``train_<stage>(config) -> AdapterRecord``.

A stage module imports trl, peft and datasets, so it is imported only when its stage runs.
"""
from __future__ import annotations

from importlib import import_module

from adapterkit.config import STAGE_CONFIGS

STAGES = tuple(STAGE_CONFIGS)  # the stage list lives in config.py


def train_stage(stage: str, config):
    """Run ``adapterkit.stages.<stage>.train_<stage>(config)``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    return getattr(import_module(f"adapterkit.stages.{stage}"), f"train_{stage}")(config)
