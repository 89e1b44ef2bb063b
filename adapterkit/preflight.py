"""Checks that cost nothing, run before any model loads: a typo must not cost the minutes
an 8B base takes to load, and a run must not train for an hour and then find that it cannot
save, or that saving would destroy the user's folder.

    preflight(config)  # output folder, data files and rows, adapters named by path or ref
"""
from __future__ import annotations

from adapterkit import rewards
from adapterkit.config import StageConfig
from adapterkit.safety import check_output_dir

# The data formats each stage trains on (the stage modules hold the same tuples).
STAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "prompt_completion", "text"),
    "reward": ("preference",),
    "dpo": ("preference",),
    "ppo": ("prompt",),
}


def check_output(config: StageConfig) -> None:
    """``output.dir`` is new, empty, this very adapter again, or ``output.overwrite`` is set;
    and writable."""
    check_output_dir(config.output.dir, name=config.output.name or config.stage, stage=config.stage,
                     overwrite=config.output.overwrite)


def check_data(config: StageConfig) -> None:
    """Every row of the training and held-out files, in the stage's formats (lengths need the
    tokenizer and are checked when it loads, still before the model)."""
    from adapterkit.data import read_rows, validate_rows
    d = config.data
    for source in (d.train, d.eval):
        if source:
            validate_rows(read_rows(source, d.hub_split), d.format, source, STAGE_FORMATS[config.stage])


def check_adapters(config: StageConfig) -> None:
    """Adapters named by path or registry ref: present, intact (sha256) and of a stage that fits
    their role (a parent is a policy adapter, a reward is a reward adapter)."""
    from adapterkit.adapters import POLICY_STAGES, REWARD_STAGES, checked_adapter
    section = getattr(config, config.stage, None)
    for ref in getattr(section, "parent", None) or []:
        checked_adapter(ref, POLICY_STAGES, "parent")
    reward = getattr(section, "reward", None)
    if reward is not None and not rewards.is_function_ref(reward):
        checked_adapter(reward, REWARD_STAGES, "reward model")
    elif reward is not None:
        rewards.load_function(reward)  # a reward function that does not import fails now


# train.report_to -> the module it needs (transformers' integrations import these)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                   "trackio": ("trackio",), "swanlab": ("swanlab",)}


def check_training(config: StageConfig) -> None:
    """Checkpoints, resume and trackers: the checkpoint folder is a folder, ``train.resume_from``
    names a checkpoint that exists, every ``train.report_to`` tracker is installed."""
    from importlib.util import find_spec
    from adapterkit.checkpoints import resolve_resume
    from adapterkit.errors import ConfigError
    ckpt = config.checkpoint_dir
    if config.train.save_steps and ckpt.exists() and not ckpt.is_dir():
        raise ConfigError(f"train.checkpoint_dir {ckpt}: exists and is not a folder")
    resolve_resume(config.train.resume_from, ckpt)
    for tracker in (t for t in config.trackers if t != "all"):
        modules = TRACKER_MODULES.get(tracker)
        if modules is None:
            raise ConfigError(f"train.report_to={tracker}: unknown tracker (known: none, "
                              f"{', '.join(TRACKER_MODULES)}, all)")
        if not any(find_spec(m) for m in modules):
            raise ConfigError(f"train.report_to={tracker}: needs `pip install {modules[0]}`")


def preflight(config: StageConfig) -> None:
    """Everything a stage can check before loading a model, in order of cost."""
    check_output(config)
    check_training(config)
    check_adapters(config)
    check_data(config)
