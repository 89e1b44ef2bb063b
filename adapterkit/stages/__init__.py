"""One file per stage; ``STAGES`` maps a stage name to its ``train_<stage>(config)``."""
from __future__ import annotations

from typing import Callable


def _sft(config):
    from adapterkit.stages.sft import train_sft
    return train_sft(config)


STAGES: dict[str, Callable] = {"sft": _sft}
