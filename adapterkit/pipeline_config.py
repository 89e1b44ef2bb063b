"""The typed config of ``adapterkit pipeline``: a YAML *pipeline recipe* that lists steps, each a
stage recipe (a shipped name or a file) with dotted overrides, wired to the earlier steps it
trains on (``parent``) and is judged by (``reward``). Defaults are here; the tiny task's values
live only in ``recipes/tiny_pipeline.yaml``. The run itself: ``pipeline.py``.

    stages:
      sft:    {recipe: tiny_sft, overrides: [data.train=chat.jsonl]}
      reward: {recipe: tiny_reward}
      dpo:    {recipe: tiny_dpo, parent: [sft], reward: reward}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from adapterkit.config import (STAGE_CONFIGS, ScorerRef, StageConfig, _format_validation, apply_overrides,
                               load_config, read_recipe)
from adapterkit.errors import ConfigError
from adapterkit.frontier import DEFAULT_BETAS, DEFAULT_KL_COEFS
from adapterkit.refs import NAME_RE
from adapterkit.sections import Section

WIRED = ("parent", "reward")  # keys of a preference stage's own section that the pipeline sets
POLICY = ("sft", "dpo", "ppo")  # stages whose adapter a later step can train on top of


class PipelineStep(Section):
    recipe: str
    """the stage's recipe: a shipped name (tiny_sft, see `adapterkit recipes`) or a YAML file"""
    stage: str | None = None
    """the stage it trains (sft, reward, dpo, ppo); default: the step's name"""
    parent: list[str] = []
    """earlier steps it trains on top of, bottom first (its <stage>.parent); dpo and ppo only"""
    reward: str | None = None
    """an earlier reward step: PPO's reward model (ppo.reward), DPO's win-rate judge (dpo.reward)"""
    overrides: list[str] = []
    """dotted overrides of the stage recipe (its own data files, steps, ...), after the pipeline's"""


class ScoreSection(Section):
    scorer: ScorerRef | None = None
    """a reward function (module:function, or a registered name such as tiny) scoring the greedy answers of the base and of every policy step to `prompts`: the table's score and change against the parent; none: no scores"""
    prompts: str | None = None
    """the held-out prompts of the score (a prompt-format data file, or tiny:<split>)"""


class PublishSection(Section):
    registry: str | None = None
    """registry root each step is published to as soon as it is trained, and reused from; default ./adapters or $ADAPTERKIT_REGISTRY"""
    prefix: str = ""
    """a step is published as <prefix><step name>"""
    domain: str | None = None
    """domain of the published adapters; default: each stage recipe's output.domain"""
    profile: str | None = None
    """a profile set, at the end, to the best-scoring policy step's serving stack (its parents, then it); none: no profile"""


class FrontierSection(Section):
    dpo: str | None = None
    """a DPO step: the frontier trains DPO at `betas` on its parent and recipe (the step is one of the points)"""
    ppo: str | None = None
    """a PPO step: the frontier trains PPO at `kl_coefs` on its parent, reward and recipe (the step is one of the points)"""
    betas: list[float] = list(DEFAULT_BETAS)
    """dpo.beta of the DPO points (one equal to the step's own is that step, not trained again)"""
    kl_coefs: list[float] = list(DEFAULT_KL_COEFS)
    """ppo.kl_coef of the PPO points (likewise)"""


class PipelineConfig(Section):
    """A pipeline recipe: stage recipes in order, each wired to the steps before it."""
    stage: Literal["pipeline"] = "pipeline"
    """what the recipe is: a pipeline (a stage recipe says sft, reward, dpo or ppo here)"""
    out: str = "runs/pipeline"
    """the run's folder: each step's adapter in <out>/<step>, its checkpoints in <out>/<step>.checkpoint, and summary.json"""
    overrides: list[str] = []
    """dotted overrides for every stage, before each step's own (e.g. base.name=meta-llama/Llama-3.2-1B)"""
    save_steps: int | None = Field(None, ge=0)
    """train.save_steps of every stage: a pipeline killed mid-stage and run again resumes that stage from its latest checkpoint; none: each recipe's own"""
    progress: bool = True
    """one progress bar per stage (train.progress)"""
    score: ScoreSection = ScoreSection()
    """how the table scores each policy"""
    publish: PublishSection = PublishSection()
    """where the adapters are published (and reused from)"""
    frontier: FrontierSection = FrontierSection()
    """reward against KL (`adapterkit frontier`) from the dpo/ppo steps' parent, in <out>/frontier; none set: no frontier"""
    stages: dict[str, PipelineStep]
    """the steps, in the order they run, by name (sft, reward, dpo, ppo, or any name with `stage:`)"""

    @model_validator(mode="after")
    def _wiring(self) -> "PipelineConfig":
        if not self.stages:
            raise ValueError("stages: empty; list at least one step")
        if (self.score.scorer is None) != (self.score.prompts is None):
            raise ValueError("score.scorer and score.prompts: set both (or neither)")
        seen: dict[str, str] = {}
        for name, step in self.stages.items():
            where = f"stages.{name}"
            if not NAME_RE.match(f"{self.publish.prefix}{name}") or ".." in name:
                raise ValueError(f"{where}: {self.publish.prefix}{name} is not a registry name (letters, digits, . _ + -)")
            kind = step.stage or name
            if kind not in STAGE_CONFIGS:
                raise ValueError(f"{where}.stage: required, the step's name is not a stage ({', '.join(STAGE_CONFIGS)})")
            step.stage = kind
            if (step.parent or step.reward) and kind not in ("dpo", "ppo"):
                raise ValueError(f"{where}: parent and reward are for dpo and ppo steps, not {kind}")
            for p in step.parent:
                if seen.get(p) not in POLICY:
                    raise ValueError(f"{where}.parent: {p!r} is not an earlier sft, dpo or ppo step")
            if step.reward is not None and seen.get(step.reward) != "reward":
                raise ValueError(f"{where}.reward: {step.reward!r} is not an earlier reward step")
            seen[name] = kind
        f = self.frontier
        for method, name in (("dpo", f.dpo), ("ppo", f.ppo)):
            if name is not None and seen.get(name) != method:
                raise ValueError(f"frontier.{method}: {name!r} is not a {method} step")
            if name is not None and not self.stages[name].parent:
                raise ValueError(f"frontier.{method}: the step {name!r} has no parent to measure KL against")
        if f.dpo and f.ppo and self.stages[f.dpo].parent != self.stages[f.ppo].parent:
            raise ValueError(f"frontier: the steps {f.dpo} and {f.ppo} have other parents; one frontier has one parent")
        return self


def load_pipeline(recipe: str | os.PathLike, overrides: list[str] = ()) -> PipelineConfig:
    """Read a pipeline recipe (a file, or a shipped name such as ``tiny_pipeline``), apply
    dotted overrides (``out=runs/x``, ``publish.profile=legal``), validate the recipe and every
    step's stage config: all before any model loads; errors name the key."""
    path, raw = read_recipe(recipe)
    raw = apply_overrides(raw, list(overrides))
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, str(path))) from None
    out = Path(config.out)
    for name in config.stages:  # every step's config, wired to where its parents will be
        stage_config(config, name, {p: str(out / p) for p in config.stages})
    return config


def _owned(config: PipelineConfig, name: str) -> dict[str, str]:
    """The keys the pipeline sets for a step -> why; an override of one is refused."""
    step = config.stages[name]
    owned = {"output.dir": f"<out>/{name}", "train.resume_from": "latest, after a kill",
             "train.checkpoint_dir": f"<out>/{name}.checkpoint"}
    if step.stage in ("dpo", "ppo"):
        owned[f"{step.stage}.parent"] = f"parent: {step.parent}"
        if step.reward is not None:
            owned[f"{step.stage}.reward"] = f"reward: {step.reward}"
    return owned


def stage_config(config: PipelineConfig, name: str, adapters: dict[str, str],
                 resume: bool = False) -> StageConfig:
    """Step ``name``'s stage config: its recipe, the pipeline's overrides, its own, then the
    wiring: output folder, parents and reward (``adapters``: step name -> adapter folder)."""
    step = config.stages[name]
    owned = _owned(config, name)
    for item in [*config.overrides, *step.overrides]:
        key = item.partition("=")[0]
        if key in owned:
            raise ConfigError(f"stages.{name}: the override {key} is the pipeline's to set ({owned[key]}); remove it")
    wiring = [f"output.dir={Path(config.out) / name}", f"train.progress={str(config.progress).lower()}"]
    if config.save_steps is not None:
        wiring.append(f"train.save_steps={config.save_steps}")
    if step.stage in ("dpo", "ppo"):
        wiring.append(f"{step.stage}.parent={json.dumps([adapters[p] for p in step.parent])}")
        if step.reward is not None:
            wiring.append(f"{step.stage}.reward={json.dumps(adapters[step.reward])}")
    if resume:
        wiring.append("train.resume_from=latest")
    try:
        return load_config(step.stage, step.recipe, [*config.overrides, *step.overrides, *wiring])
    except ConfigError as err:
        raise ConfigError(f"stages.{name} ({step.recipe}): {err}") from None


def explain() -> list[str]:
    """Every key of a pipeline recipe with its type, default and meaning."""
    lines: list[str] = []
    for prefix, model in (("", PipelineConfig), ("stages.<name>.", PipelineStep),
                          ("score.", ScoreSection), ("publish.", PublishSection),
                          ("frontier.", FrontierSection)):
        for key, field in model.model_fields.items():
            if not prefix and key in ("score", "publish", "frontier", "stage"):
                continue
            default = "required" if field.is_required() else f"default {field.default!r}"
            lines.append(f"  {prefix}{key} ({default}): {field.description}")
    return lines
