"""Where a stage's checkpoints live and which one ``train.resume_from`` means. Standard library
only: preflight resolves ``resume_from`` before any model loads.

    <output.dir>.checkpoint/        train.checkpoint_dir: ours, beside the user's adapter folder
        checkpoint-20/              one per train.save_steps; the last train.save_total_limit kept
        checkpoint-40/

The trainer stages (SFT, reward, DPO) write transformers' checkpoint layout (the adapter as
safetensors, optimizer, scheduler, RNG and trainer state); PPO writes its own
(``stages/ppo_checkpoint.py``, safetensors and JSON) in the same folders.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from adapterkit.errors import ConfigError

PREFIX = "checkpoint-"
STATE_FILES = ("trainer_state.json", "trainer.json")  # written last: transformers', PPO's


def step_of(path: Path) -> int | None:
    """The step a ``checkpoint-<step>`` folder was written at; None for anything else."""
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(step_of(p), p) for p in folder.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def complete(path: Path) -> bool:
    """A checkpoint whose last file (the trainer state) was written whole: a process killed
    while saving leaves one without it, and resuming takes the one before."""
    for name in STATE_FILES:
        try:
            json.loads((path / name).read_text())
            return True
        except (OSError, ValueError):
            continue
    return False


def resolve_resume(resume_from: str | None, checkpoint_dir: Path) -> Path | None:
    """``train.resume_from`` as a checkpoint folder: ``latest`` is the newest one in
    ``checkpoint_dir``; a folder of checkpoints is its newest; else the folder itself. A
    missing checkpoint is a config error, raised before anything loads."""
    if resume_from is None:
        return None
    where = checkpoint_dir if resume_from == "latest" else Path(resume_from).expanduser()
    if not where.is_dir():
        raise ConfigError(f"train.resume_from={resume_from}: {where} is not a folder (no checkpoint "
                          "to resume from; train.save_steps > 0 writes them)")
    if complete(where):
        return where
    whole = [p for p in checkpoints(where) if complete(p)]
    if whole:
        return whole[-1]
    raise ConfigError(f"train.resume_from={resume_from}: {where} holds no complete checkpoint "
                      "(a checkpoint-<step> folder with its trainer state)")


def rotate(folder: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoint folders (only ``checkpoint-<step>`` folders
    are ever removed: the folder may be one the user named)."""
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
