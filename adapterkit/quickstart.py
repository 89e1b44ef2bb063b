"""The main job on the embedded default: tiny base -> SFT -> ... -> a table of scores.

Each step is a function registered in ``STEPS``; later stages add theirs. Every artifact
stays under the output folder, and ``summary.json`` records what each step produced.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adapterkit import tiny
from adapterkit.config import load_config


@dataclass
class Context:
    out: Path
    progress: bool = True
    summary: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    _eval_prompts: list | None = None

    @property
    def tiny_dir(self) -> Path:
        return self.out / "tiny"

    def data(self, split: str) -> str:
        return str(self.tiny_dir / "data" / f"{split}.jsonl")

    def eval_prompts(self) -> list:
        if self._eval_prompts is None:
            with open(self.data("prompts_eval")) as f:
                self._eval_prompts = [json.loads(line)["prompt"] for line in f]
        return self._eval_prompts

    def overrides(self, stage: str) -> list[str]:
        """Point a shipped tiny recipe at this run's base, data and output folder."""
        return [f"base.name={self.tiny_dir / 'base'}", f"output.dir={self.out / stage}",
                f"train.progress={str(self.progress).lower()}"]

    def score(self, adapter_dirs: list[str]) -> float:
        """Ground-truth score of base + adapters on the held-out prompts."""
        from adapterkit.adapters import activate, load_adapters
        from adapterkit.base import load_base
        section = load_config("sft", "tiny_sft", self.overrides("sft")).base
        model, tok = load_base(section)
        if adapter_dirs:
            model, _ = load_adapters(model, adapter_dirs)
            activate(model, list(model.peft_config))
        from adapterkit.evaluate import mean_score
        score, _ = mean_score(model, tok, self.eval_prompts(), tiny.reward)
        return score


def step_base(ctx: Context) -> None:
    tiny.ensure_tiny(ctx.tiny_dir)
    ctx.summary["base_dir"] = str(ctx.tiny_dir / "base")
    ctx.summary["stages"]["base"] = {"score": ctx.score([])}


def step_sft(ctx: Context) -> None:
    from adapterkit.stages.sft import train_sft
    config = load_config("sft", "tiny_sft", ctx.overrides("sft") + [
        f"data.train={ctx.data('sft')}", f"data.eval={ctx.data('sft_eval')}"])
    record = train_sft(config)
    ctx.summary["stages"]["sft"] = {"adapter": str(record.path), "parent": "base",
                                    "score": ctx.score([str(record.path)]),
                                    "eval_loss": record.metrics.get("eval_loss")}


def step_reward(ctx: Context) -> None:
    from adapterkit.stages.reward import train_reward
    config = load_config("reward", "tiny_reward", ctx.overrides("reward") + [
        f"data.train={ctx.data('preferences')}", f"data.eval={ctx.data('preferences_eval')}"])
    record = train_reward(config)
    ctx.summary["stages"]["reward"] = {"adapter": str(record.path), "accuracy": record.metrics["eval_accuracy"]}


def step_dpo(ctx: Context) -> None:
    """DPO on top of the SFT adapter (its reference); the reward model judges policy vs parent."""
    from adapterkit.stages.dpo import train_dpo
    stages = ctx.summary["stages"]
    sft = stages["sft"]["adapter"]
    reward = [f"dpo.reward={json.dumps(stages['reward']['adapter'])}"] if "reward" in stages else []
    config = load_config("dpo", "tiny_dpo", ctx.overrides("dpo") + reward + [
        f"data.train={ctx.data('preferences')}", f"data.eval={ctx.data('preferences_eval')}",
        f"dpo.prompts={ctx.data('prompts_eval')}", f"dpo.parent={json.dumps([sft])}"])
    record = train_dpo(config)
    stages["dpo"] = {"adapter": str(record.path), "parent": "sft", "score": ctx.score([sft, str(record.path)]),
                     "kl": record.metrics["kl"], **{k: record.metrics[k] for k in ("win_rate",)
                                                    if k in record.metrics}}


def step_ppo(ctx: Context) -> None:
    """PPO on top of the SFT adapter (its reference), a sibling of DPO; the reward and value
    adapters sit on the same 4-bit base as the policy."""
    from adapterkit.stages.ppo import train_ppo
    stages = ctx.summary["stages"]
    sft = stages["sft"]["adapter"]
    config = load_config("ppo", "tiny_ppo", ctx.overrides("ppo") + [
        f"data.train={ctx.data('prompts')}", f"data.eval={ctx.data('prompts_eval')}",
        f"ppo.parent={json.dumps([sft])}", f"ppo.reward={json.dumps(stages['reward']['adapter'])}"])
    record = train_ppo(config)
    stages["ppo"] = {"adapter": str(record.path), "parent": "sft", "score": ctx.score([sft, str(record.path)]),
                     "kl": record.metrics["kl"]}


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


STEP_HELP = {"base": "build the tiny base, tokenizer and task (once, about 30 s on CPU), score the base",
             "sft": "supervised fine-tuning on the base", "reward": "a reward model on preference pairs",
             "dpo": "DPO on top of the SFT adapter", "ppo": "PPO on top of the SFT adapter, against the reward model",
             "publish": "publish every adapter to the registry, set the best stack as a profile"}

STEPS: dict[str, Callable[[Context], None]] = {"base": step_base, "sft": step_sft,
                                               "reward": step_reward, "dpo": step_dpo,
                                               "ppo": step_ppo}


def run_quickstart(out: str | os.PathLike = "runs/quickstart", progress: bool = True,
                   on_step: Callable[[str], None] | None = None) -> dict:
    """Run every registered step in order; returns (and writes) the summary."""
    ctx = Context(out=Path(out).resolve(), progress=progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.summary = {"base_dir": None, "stages": {}}
    for name, step in STEPS.items():
        if on_step:
            on_step(name)
        start = time.perf_counter()
        step(ctx)
        ctx.timings[name] = round(time.perf_counter() - start, 1)
    ctx.summary["seconds"] = ctx.timings
    (ctx.out / "summary.json").write_text(json.dumps(ctx.summary, indent=2))
    return ctx.summary


def step_publish(ctx: Context) -> None:
    """Publish every adapter the run made to ``DIR/adapters``, set the ``flip`` profile to the
    best-scoring policy's serving stack (its parents, then itself), keep the lineage tree."""
    from adapterkit.lineage import lineage, serving_stack, tree_lines
    from adapterkit.profiles import set_profile
    from adapterkit.registry import Registry
    reg = Registry.open(ctx.out / "adapters")
    policies = []
    for stage, entry in ctx.summary["stages"].items():
        if entry.get("adapter"):
            published = reg.publish(entry["adapter"], name=f"tiny-{stage}", domain="flip")
            entry["registry_ref"] = published.ref
            if published.stage != "reward":
                policies.append((entry.get("score") or 0.0, len(policies), published.ref))
    ctx.summary["registry"] = str(reg.root)
    if not policies:
        return
    top = max(policies)[2]  # best score; on a tie, the later stage
    profile = set_profile(reg, "flip", serving_stack(reg, top), domain="flip")
    ctx.summary["profile"] = profile.name
    ctx.summary["registry_tree"] = tree_lines(lineage(reg, top))


STEPS["publish"] = step_publish  # keep last: it publishes what every step above produced
