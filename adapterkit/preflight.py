"""Checks that cost nothing, run before any model loads: a typo must not cost the minutes
an 8B base takes to load, and a run must not train for an hour and then find that it cannot
save, or that saving would destroy the user's folder.

    preflight(config)  # output folder, data files and rows, adapters named by path or ref, reward functions
"""
from __future__ import annotations

from pathlib import Path

from adapterkit import rewards
from adapterkit.config import StageConfig
from adapterkit.errors import AdapterkitError, ConfigError
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


def check_functions(config: StageConfig, n: int = 4) -> None:
    """Every reward function and scorer the stage calls, on the first ``n`` prompts of each
    split it will score with an empty answer (a model can give one): a scorer for another task
    (``ppo.scorer=tiny`` on your prompts), or one that returns the wrong thing, fails now, not
    mid-run or after training."""
    from adapterkit.data import load_data

    def value(key: str):  # "ppo.scorer" -> config.ppo.scorer
        section, _, name = key.partition(".")
        return getattr(getattr(config, section), name)
    uses = {"ppo": [("ppo.reward", "data.train"), ("ppo.scorer", "data.train"), ("ppo.scorer", "data.eval")],
            "dpo": [("dpo.scorer", "dpo.prompts")]}.get(config.stage, [])
    for fn_key, data_key in uses:
        ref, source = value(fn_key), value(data_key)
        if ref is None or not source or not rewards.is_function_ref(ref):
            continue
        rows = load_data(source, fmt="auto", allowed=("prompt", "preference", "prompt_completion")).rows[:n]
        prompts = [r["prompt"] for r in rows]
        try:
            rewards.score_completions(rewards.load_function(ref), prompts, [""] * len(prompts))
        except AdapterkitError as err:
            raise ConfigError(f"{fn_key}: tried on the first {len(prompts)} prompts of {data_key}={source} "
                              f"with empty answers: {err}") from err


# train.report_to -> the module it needs (transformers' integrations import these)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                   "trackio": ("trackio",), "swanlab": ("swanlab",)}


def check_training(config: StageConfig) -> None:
    """The launcher, checkpoints, resume and trackers: PPO is not run under FSDP or DeepSpeed
    (its own loop steps one DDP model; ``distributed.engine``), the checkpoint folder is a folder, ``train.resume_from``
    names a checkpoint that exists, every ``train.report_to`` tracker is installed."""
    from importlib.util import find_spec
    from adapterkit.checkpoints import resolve_resume
    from adapterkit.errors import ConfigError
    from adapterkit.distributed import engine
    if config.stage == "ppo" and engine() is not None:
        raise ConfigError(f"ppo under accelerate's {engine()} config: PPO runs on one GPU or DDP over "
                          "several (adapterkit accelerate ddp); FSDP and DeepSpeed are for sft, reward and dpo")
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host (``HF_ENDPOINT``), a few seconds at most."""
    import os
    import socket
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def check_base(config: StageConfig) -> None:
    """A hub base that is not in the local cache needs the hub: offline (``HF_HUB_OFFLINE``) or
    unreachable, that is one line now, not a minute of retries and a traceback at load time."""
    from adapterkit.base import resolve_base
    from adapterkit.data import offline
    b = config.base
    source = resolve_base(b.name)
    if Path(source).is_dir():
        return
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(source, "config.json", revision=b.revision), str):
        return  # cached: transformers reads it from there
    why = ("the hub is offline (HF_HUB_OFFLINE)" if offline()
           else "the hub cannot be reached" if not hub_reachable() else None)
    if why:
        raise AdapterkitError(f"base {b.name!r}: cannot load its tokenizer or weights: a hub model that is "
                              f"not in the local cache, and {why}; download it once while online, or "
                              "give base.name a local folder")


def preflight(config: StageConfig) -> None:
    """Everything a stage can check before loading a model, in order of cost."""
    check_output(config)
    check_training(config)
    check_base(config)
    check_adapters(config)
    check_data(config)
    check_functions(config)
