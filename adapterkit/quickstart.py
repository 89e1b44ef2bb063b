"""The main job on the embedded default: the ``tiny_pipeline`` pipeline (tiny base -> SFT ->
reward -> DPO and PPO -> publish -> profile) with every artifact under one folder.

The tiny build is copied to ``<out>/tiny`` and every stage reads its base and data there;
the registry is ``<out>/adapters``. Run again into the same folder, every stage is reused
(``pipeline.py``). ``summary.json`` records what each step produced.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from adapterkit import tiny
from adapterkit.pipeline_config import PipelineConfig, load_pipeline

RECIPE = "tiny_pipeline"
# The tiny task's splits each stage trains and evaluates on (the recipes name them tiny:<split>).
SPLITS = {"sft": {"data.train": "sft", "data.eval": "sft_eval"},
          "reward": {"data.train": "preferences", "data.eval": "preferences_eval"},
          "dpo": {"data.train": "preferences", "data.eval": "preferences_eval", "dpo.prompts": "prompts_eval"},
          "ppo": {"data.train": "prompts", "data.eval": "prompts_eval"}}


def quickstart_config(out: Path, progress: bool = True) -> PipelineConfig:
    """``tiny_pipeline`` pointed at the copy of the tiny build in ``out/tiny``."""
    data = out / "tiny" / "data"
    config = load_pipeline(RECIPE, [f"progress={str(progress).lower()}"])
    config.out, config.publish.registry = str(out), str(out / "adapters")
    config.score.prompts = str(data / "prompts_eval.jsonl")
    config.overrides = [f"base.name={out / 'tiny' / 'base'}"]
    for step in config.stages.values():
        step.overrides = [*step.overrides, *(f"{k}={data / s}.jsonl" for k, s in SPLITS[step.stage].items())]
    return config


def run_quickstart(out: str | os.PathLike = "runs/quickstart", progress: bool = True,
                   on_step: Callable[[str, str], None] | None = None) -> dict:
    """Build (or copy) the tiny default into ``out/tiny``, then run the pipeline on it; returns
    (and writes) the summary."""
    import json

    from adapterkit.pipeline import run_pipeline
    out = Path(out).resolve()
    if on_step:
        on_step("base", "build the tiny base, tokenizer and task (once, about 30 s on CPU), score the base")
    start = time.perf_counter()
    tiny.ensure_tiny(out / "tiny")
    built = time.perf_counter() - start
    summary = run_pipeline(quickstart_config(out, progress),
                           on_step=None if on_step is None else lambda s, h: s == "base" or on_step(s, h))
    summary["seconds"]["base"] = round(summary["seconds"]["base"] + built, 1)
    summary = {"base_dir": str(out / "tiny" / "base"), **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def change(stages: dict, stage: str) -> float | None:
    """A stage's held-out score minus its parent's (the stage it was trained on top of)."""
    entry = stages[stage]
    parent = stages.get(entry.get("parent") or "", {})
    if entry.get("score") is None or parent.get("score") is None:
        return None
    return entry["score"] - parent["score"]


def regression(stages: dict, stage: str) -> str | None:
    """One line saying why a stage made things worse than its parent; None when it did not."""
    delta = change(stages, stage)
    if delta is None or delta >= 0:
        return None
    entry = stages[stage]
    return (f"held-out score {entry['score']:.3f} is below its parent {entry['parent']}'s "
            f"{stages[entry['parent']]['score']:.3f}")
