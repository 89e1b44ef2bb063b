"""One file per stage; ``STAGES`` maps a stage name to its ``train_<stage>(config)``."""
from __future__ import annotations

from typing import Callable


def _sft(config):
    from adapterkit.stages.sft import train_sft
    return train_sft(config)


def _ppo(config):
    from adapterkit.stages.ppo import train_ppo
    return train_ppo(config)


def _reward(config):
    from adapterkit.stages.reward import train_reward
    return train_reward(config)


def _dpo(config):
    from adapterkit.stages.dpo import train_dpo
    return train_dpo(config)


STAGES: dict[str, Callable] = {"sft": _sft, "reward": _reward, "dpo": _dpo, "ppo": _ppo}
