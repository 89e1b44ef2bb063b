"""Typed configs, one per stage, with every default here and in ``sections.py`` (the shared
sections).

A recipe is YAML; overrides are dotted ``key.sub=value`` strings whose values are
parsed as YAML scalars (``lora.r=8``, ``train.learning_rate=1e-4``). Unknown keys,
wrong types and impossible values are refused with the key named.
"""
from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, Field, PlainSerializer, ValidationError,
                      model_validator)

from adapterkit import rewards
from adapterkit.errors import ConfigError
from adapterkit.sections import (BaseSection, DataSection, LoraSection, OutputSection, Section,
                                 TrainSection)

def _function_ref(value):
    if not rewards.is_function_ref(value):
        raise ValueError(f"neither a reward function name ({', '.join(rewards.REWARDS)}) nor module:function")
    return value


# A reward adapter (directory or registry ref) or a reward function (module:function, a
# registered name, or in Python the callable); written to YAML/JSON as text.
RewardRef = Annotated[str | Callable[..., Any], PlainSerializer(rewards.describe, when_used="json")]
# A ground-truth scorer: a reward function only (see adapterkit.rewards).
ScorerRef = Annotated[RewardRef, AfterValidator(_function_ref)]


class StageConfig(Section):
    """Defaults here are neutral: the base and the data are always named by the recipe (the
    tiny task's values live only in recipes/tiny_*.yaml)."""
    stage: str
    """the stage this recipe trains"""
    base: BaseSection
    """the base model"""
    data: DataSection
    """training and held-out data"""
    lora: LoraSection = LoraSection()
    """the LoRA adapter"""
    train: TrainSection = TrainSection()
    """optimisation, evaluation, checkpoints and tracking"""
    output: OutputSection = OutputSection()
    """where the adapter goes"""

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go: ``train.checkpoint_dir``, else ``<output.dir>.checkpoint``."""
        return Path(self.train.checkpoint_dir or f"{Path(self.output.dir)}.checkpoint").expanduser()

    @property
    def logging_dir(self) -> Path:
        """The trackers' local folder: ``train.logging_dir``, else ``<output.dir>.logs``."""
        return Path(self.train.logging_dir or f"{Path(self.output.dir)}.logs").expanduser()

    @property
    def trackers(self) -> list[str]:
        """``train.report_to`` as a list, without ``none``."""
        value = self.train.report_to
        return [t for t in ([value] if isinstance(value, str) else value) if t != "none"]


class SFTConfig(StageConfig):
    """train a QLoRA SFT adapter from a recipe"""
    stage: Literal["sft"] = "sft"
    """the stage this recipe trains"""

    @model_validator(mode="after")
    def _packing_modes(self) -> "SFTConfig":
        if self.train.packing and self.train.padding_free:
            raise ValueError("train.packing and train.padding_free: choose one")
        return self


STAGE_CONFIGS: dict[str, type[StageConfig]] = {"sft": SFTConfig}


def register_stage_config(cls: type[StageConfig]) -> type[StageConfig]:
    STAGE_CONFIGS[cls.model_fields["stage"].default] = cls
    return cls


class RewardSection(Section):
    """Bradley-Terry reward model: a LoRA adapter plus a scalar head (``score``)."""
    center_rewards_coefficient: float | None = Field(None, ge=0)
    """weight of a penalty that centres the rewards at 0 (Eisenstein et al. 2023, eq. 2); none: off"""
    eval_batch_size: int = Field(32, gt=0)
    """pairs per batch when scoring the held-out pairs"""


@register_stage_config
class RewardConfig(StageConfig):
    """train a reward model (LoRA + scalar head) on preference pairs"""
    stage: Literal["reward"] = "reward"
    """the stage this recipe trains"""
    reward: RewardSection = RewardSection()
    """reward-model settings"""


class DPOSection(Section):
    """DPO (Rafailov et al. 2023) on top of a frozen parent stack, which is the reference."""
    parent: list[str] = []
    """adapter dirs or registry refs, bottom first; none: plain DPO on the base"""
    mode: Literal["new", "continue"] = "new"
    """new: a fresh LoRA on top of the parents; continue: train a copy of the last parent"""
    beta: float = Field(0.1, gt=0)
    """DPO's beta: the strength of the implicit KL to the reference"""
    loss_type: Literal["sigmoid", "ipo", "robust"] = "sigmoid"
    """sigmoid (DPO), ipo (IPO) or robust (rDPO)"""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """cDPO / rDPO label-flip rate"""
    sft_weight: float = Field(0.0, ge=0)
    """RPO (Pang et al. 2024): + weight * NLL of chosen"""
    precompute_ref_logps: bool = False
    """one reference pass before training, none during it"""
    scorer: ScorerRef | None = None
    """ground-truth reward function for the held-out prompts"""
    prompts: str | None = None
    """held-out prompts for score, KL and win rate"""
    reward: str | None = None
    """reward adapter dir: win rate of the policy over its parent"""
    max_new_tokens: int = Field(16, gt=0)
    """tokens generated per held-out prompt"""


@register_stage_config
class DPOConfig(StageConfig):
    """train a DPO adapter on top of a frozen parent stack (the recipe names it)"""
    stage: Literal["dpo"] = "dpo"
    """the stage this recipe trains"""
    dpo: DPOSection = DPOSection()
    """DPO settings"""

    @model_validator(mode="after")
    def _parent_for_continue(self) -> "DPOConfig":
        if self.dpo.mode == "continue" and not self.dpo.parent:
            raise ValueError("dpo.mode=continue trains a copy of the last parent; dpo.parent is empty")
        return self


class PPOSection(Section):
    """PPO (Schulman et al. 2017) with InstructGPT's KL-shaped reward (Ouyang et al. 2022)."""
    parent: list[str] = []
    """frozen parent stack (dirs or registry refs, bottom first): the reference"""
    reward: RewardRef | None = None
    """required: a reward adapter (LoRA + score head; dir or registry ref), or a reward function (module:function with trl's GRPO signature, see adapterkit.rewards)"""
    value_init: Literal["reward", "fresh"] | None = None
    """value adapter + head: a copy of the reward adapter's, or new; default: the reward's when the reward is an adapter, else new"""
    rollout_batch_size: int = Field(64, gt=0)
    """prompts per PPO step (per process)"""
    ppo_epochs: int = Field(2, gt=0)
    """passes over each step's rollouts"""
    max_new_tokens: int = Field(16, gt=0)
    """tokens generated per rollout"""
    temperature: float = Field(1.0, gt=0)
    """sampling temperature of the rollouts"""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE discount"""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda"""
    clip_range: float = Field(0.2, gt=0)
    """PPO's policy ratio clip"""
    clip_range_value: float = Field(0.2, gt=0)
    """value-function clip"""
    vf_coef: float = Field(0.1, ge=0)
    """value loss weight"""
    kl_coef: float = Field(0.05, ge=0)
    """beta: the weight of the per-token KL to the parent against the score; in the reward's units, or in units of its standard deviation with normalize_scores (then one value suits a [0, 1] reward function and a reward model scoring about +-8 alike); the initial value when adaptive_kl"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator: k1 (log-ratio) or k3 (Schulman's, non-negative)"""
    adaptive_kl: bool = False
    """adapt kl_coef toward kl_target (Ziegler et al. 2019)"""
    kl_target: float = Field(6.0, gt=0)
    """the adaptive controller's target KL"""
    kl_horizon: float = Field(10000, gt=0)
    """the adaptive controller's horizon"""
    normalize_scores: bool = False
    """Normalise each score by the running mean and standard deviation of all scores so far, before KL shaping (as the OpenAI/trl practice of reward normalisation): kl_coef is then in units of the reward's spread, the same for a [0, 1] reward function as for a reward model scoring about +-8"""
    whiten_rewards: bool = False
    """whiten the per-token rewards before GAE"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of unfinished responses"""
    scorer: ScorerRef | None = None
    """ground-truth reward function for the held-out prompts"""
    eval_every: int = Field(0, ge=0)
    """Held-out evaluation every N PPO steps (0: only at the end): the greedy responses to the data.eval prompts, scored by ``scorer`` when set, else by the reward. It draws the held-out curve in ppo.png, and guards against over-optimising a reward model: train.eval_steps is the same setting"""
    keep_best: bool = False
    """save the policy from the best evaluation (step 0 = the parent)"""
    patience: int = Field(0, ge=0)
    """stop after this many evaluations without a new best; 0: never"""
    # Checkpoints: train.save_steps, train.checkpoint_dir and train.resume_from, as every stage
    # (ppo.checkpoint_every, ppo.checkpoint_dir and ppo.resume_from are read as those)


PPO_ALIASES = {"checkpoint_every": "save_steps", "checkpoint_dir": "checkpoint_dir", "resume_from": "resume_from"}


@register_stage_config
class PPOConfig(StageConfig):
    """train a PPO policy adapter on a frozen parent stack, with reward and value adapters on
    the same 4-bit base"""
    stage: Literal["ppo"] = "ppo"
    """the stage this recipe trains"""
    ppo: PPOSection = PPOSection()
    """PPO settings"""

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, raw: Any) -> Any:
        """The checkpoint keys PPO had before every stage checkpointed: ``ppo.checkpoint_every``
        is ``train.save_steps``, ``ppo.checkpoint_dir`` and ``ppo.resume_from`` the train keys."""
        if not isinstance(raw, dict) or not isinstance(raw.get("ppo"), dict):
            return raw
        ppo = dict(raw["ppo"])
        moved = {old: ppo.pop(old) for old in PPO_ALIASES if old in ppo}
        if not moved:
            return raw
        train = dict(raw.get("train") or {})
        for old, value in moved.items():
            key = PPO_ALIASES[old]
            if train.get(key) not in (None, 0, value):
                raise ValueError(f"train.{key} and its alias ppo.{old}: different values; set one")
            train[key] = value
        return {**raw, "ppo": ppo, "train": train}

    @model_validator(mode="after")
    def _batches(self) -> "PPOConfig":
        if self.train.eval_steps and not self.ppo.eval_every:
            self.ppo.eval_every = self.train.eval_steps
        elif self.train.eval_steps not in (0, self.ppo.eval_every):
            raise ValueError("train.eval_steps and ppo.eval_every: different values; set one")
        if self.ppo.reward is None:
            raise ValueError("ppo.reward: required (a reward adapter directory, or module:function)")
        if self.ppo.value_init == "reward" and rewards.is_function_ref(self.ppo.reward):
            raise ValueError("ppo.value_init=reward copies a reward adapter, but ppo.reward is a "
                             "function; use ppo.value_init=fresh")
        if (self.ppo.keep_best or self.ppo.patience) and not self.ppo.eval_every:
            raise ValueError("ppo.keep_best and ppo.patience need held-out evaluations: set "
                             "ppo.eval_every > 0 (or turn them off)")
        minibatch = self.train.batch_size * self.train.grad_accum
        if self.ppo.rollout_batch_size % minibatch:
            raise ValueError(f"ppo.rollout_batch_size={self.ppo.rollout_batch_size} must be a multiple "
                             f"of train.batch_size * train.grad_accum = {minibatch}")
        return self


def explain(stage: str) -> list[str]:
    """Every key of a stage's recipe: ``section.key (type, default): description``, the
    lines ``adapterkit recipes --explain`` prints."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                lines.append(f"{prefix}{name}: {field.description}")
                walk(kind, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else f"default {field.default!r}"
            from typing import get_args, get_origin
            shown = (" | ".join(map(str, get_args(kind))) if get_origin(kind) is Literal
                     else getattr(kind, "__name__", None) or str(kind).replace("typing.", ""))
            lines.append(f"  {prefix}{name} ({shown}, {default}): {field.description}")
    walk(STAGE_CONFIGS[stage], "")
    return lines


def recipe_path(recipe: str | os.PathLike) -> Path:
    """A recipe file, or the name of one shipped with the package (``tiny_sft``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    if path.parent != Path(".") or path.suffix:  # a path the user typed: never a shipped stand-in
        raise ConfigError(f"{recipe}: no such recipe file (shipped recipes are named without a "
                          f"folder or .yaml: {', '.join(shipped_recipes())})")
    shipped = resources.files("adapterkit") / "recipes" / f"{Path(recipe).stem}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"{recipe}: no such recipe file (nor a shipped recipe of that name: "
                      f"{', '.join(shipped_recipes())})")


def shipped_recipes() -> list[str]:
    folder = resources.files("adapterkit") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.learning_rate=1e-4"]`` -> nested dict updates (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return raw


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"config error in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def build_config(stage: str, raw: dict[str, Any], source: str = "<config>") -> StageConfig:
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGE_CONFIGS)}")
    raw = dict(raw)
    if raw.setdefault("stage", stage) != stage:
        raise ConfigError(f"config error in {source}: stage: this recipe is for "
                          f"{raw['stage']!r}, not {stage!r}")
    try:
        return STAGE_CONFIGS[stage].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def load_config(stage: str, recipe: str | os.PathLike | None = None,
                overrides: list[str] = ()) -> StageConfig:
    """Read a recipe (or start from defaults), apply overrides, validate: the config a stage
    trains from. Unknown keys and impossible values raise ``ConfigError`` naming the key.

    Example::

        config = load_config("sft", "tiny_sft", ["lora.r=16", "train.learning_rate=1e-4"])
        config = load_config("dpo", "my_recipe.yaml", ["dpo.parent=[runs/sft]"])
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if recipe is not None:
        path, raw = read_recipe(recipe)
        source = str(path)
    recipe_train = (raw.get("data") or {}).get("train")
    raw = apply_overrides(raw, list(overrides))
    unbind_recipe_task(raw, recipe_train, overrides, source)
    return build_config(stage, raw, source)


# held-out splits and scorers that belong to the task of the recipe's training data
TASK_BOUND = (("data", "eval"), ("dpo", "prompts"), ("dpo", "scorer"), ("ppo", "scorer"))


def unbind_recipe_task(raw: dict, recipe_train, overrides, source: str) -> list[str]:
    """Where an override swaps a recipe's training data for data of another task (``tiny_dpo``
    with ``data.train=my_pairs.jsonl``), the recipe's held-out splits and scorer of its own
    task (``data.eval=tiny:preferences_eval``, ``dpo.scorer=tiny``) would measure the user's
    model on the tiny task and report that as its score, and PPO's ``keep_best`` would choose
    its step by it. They are set to null, with a warning that names them; overriding one keeps
    it. Returns the dropped ``key=value`` items."""
    from adapterkit import resolvers
    given = {item.partition("=")[0].strip() for item in overrides}
    if "data.train" not in given:
        return []
    train = (raw.get("data") or {}).get("train")
    recipe_task = resolvers.task_of(recipe_train)
    if recipe_task is None or resolvers.task_of(train) == recipe_task:
        return []
    dropped = []
    for section, key in TASK_BOUND:
        node = raw.get(section) or {}
        if f"{section}.{key}" not in given and resolvers.task_of(node.get(key)) == recipe_task:
            dropped.append(f"{section}.{key}={node[key]}")
            node[key] = None
    if dropped:
        logging.getLogger("adapterkit").warning(
            "%s: data.train=%s is not from the %s task, so the recipe's %s-task settings %s are dropped; "
            "set them to your own held-out data and scorer to evaluate on your task", source, train, recipe_task,
            recipe_task, ", ".join(dropped))
    return dropped


def read_recipe(recipe: str | os.PathLike) -> tuple[Path, dict]:
    """A recipe file (or shipped name) and its YAML mapping, unvalidated (stage or pipeline)."""
    path = recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return path, raw


def load_recipe(recipe, overrides: list[str], stage: str | None = None):
    """A recipe's config for the stage its ``stage:`` key names (or ``stage`` when it names none)."""
    path, raw = read_recipe(recipe)
    declared = raw.get("stage")
    if stage is None and declared is None:
        raise ConfigError(f"{path}: no stage: key; say which stage (--stage sft, reward, dpo or ppo)")
    return load_config(stage or declared, recipe, overrides)


def dump_config(config: StageConfig) -> str:
    """The resolved config as YAML, saved beside every adapter."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
