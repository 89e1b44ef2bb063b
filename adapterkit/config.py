"""Typed configs, one per stage, with every default in this file.

A recipe is YAML; overrides are dotted ``key.sub=value`` strings whose values are
parsed as YAML scalars (``lora.r=8``, ``train.learning_rate=1e-4``). Unknown keys,
wrong types and impossible values are refused with the key named.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapterkit.errors import ConfigError

Quantization = Literal["nf4", "int8", "none"]
DType = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseSection(Section):
    name: str = "tiny"  # hub name, local directory, or "tiny" (the embedded default)
    revision: str | None = None
    quantization: Quantization = "nf4"
    compute_dtype: DType = "float32"
    double_quant: bool = True
    trust_remote_code: bool = False


class DataSection(Section):
    train: str = "tiny:sft"  # file, directory, hub dataset, or "tiny:<split>"
    eval: str | None = None
    format: Literal["auto", "messages", "prompt_completion", "text", "preference", "prompt"] = "auto"
    max_length: int = Field(256, gt=0)
    on_long: Literal["error", "truncate", "drop"] = "error"
    hub_split: str = "train"


class LoraSection(Section):
    r: int = Field(8, gt=0)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainSection(Section):
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    packing: bool = False
    padding_free: bool = False
    seed: int = 0
    logging_steps: int = Field(5, gt=0)
    progress: bool = True


class OutputSection(Section):
    dir: str = "runs/adapter"
    name: str | None = None  # defaults to the stage name
    domain: str = "general"
    tags: list[str] = []
    publish: str | None = None  # registry name to publish under after training
    registry: str | None = None  # registry root; default ./adapters or $ADAPTERKIT_REGISTRY


class StageConfig(Section):
    stage: str
    base: BaseSection = BaseSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()


class SFTConfig(StageConfig):
    stage: Literal["sft"] = "sft"

    @model_validator(mode="after")
    def _packing_modes(self) -> "SFTConfig":
        if self.train.packing and self.train.padding_free:
            raise ValueError("train.packing and train.padding_free: choose one")
        return self


STAGE_CONFIGS: dict[str, type[StageConfig]] = {"sft": SFTConfig}


def register_stage_config(cls: type[StageConfig]) -> type[StageConfig]:
    STAGE_CONFIGS[cls.model_fields["stage"].default] = cls
    return cls


def recipe_path(recipe: str | os.PathLike) -> Path:
    """A recipe file, or the name of one shipped with the package (``tiny_sft``)."""
    path = Path(recipe)
    if path.is_file():
        return path
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
    """Read a recipe (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if recipe is not None:
        path = recipe_path(recipe)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    return build_config(stage, raw, source)


def dump_config(config: StageConfig) -> str:
    """The resolved config as YAML, saved beside every adapter."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
