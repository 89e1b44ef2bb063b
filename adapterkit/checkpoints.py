"""Where a stage's checkpoints live, which one ``train.resume_from`` means, and what they hold:
safetensors for tensors and JSON for the rest, never a pickle. The module imports the standard
library only (torch and safetensors inside the functions that write and read): preflight
resolves ``resume_from`` before any model loads.

    <output.dir>.checkpoint/        train.checkpoint_dir: ours, beside the user's adapter folder
        checkpoint-20/              one per train.save_steps; the last train.save_total_limit kept
        checkpoint-40/

A trainer stage's (SFT, reward, DPO) checkpoint, written by transformers' checkpointing with its
file hooks replaced by the functions below (bound in ``_compat.safetensors_checkpoints``):

    adapter_model.safetensors, adapter_config.json    the trained adapter (peft's save_pretrained)
    tokenizer files                                   the processing class's save_pretrained
    optimizer.safetensors, optimizer.json             optimizer state: tensors / param groups, scalars
    scheduler.json                                    the LR scheduler's state_dict
    scaler.json                                       the fp16 loss scaler's state_dict, when there is one
    rng_state.safetensors, rng_state.json             torch CPU (and CUDA) / python and numpy RNG
    trainer_state.json                                transformers' TrainerState, written last

(no ``training_args.bin``: resuming does not read it). PPO writes its own
(``stages/ppo_checkpoint.py``), with the same optimizer flattening, in the same folders.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

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


# -- what a checkpoint holds: safetensors and JSON --------------------------------------------------

def flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer's ``state_dict()`` as (tensors for safetensors, the rest for JSON): tensors
    keyed ``<param index>/<name>`` (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``); the JSON part
    holds ``param_groups`` and the per-parameter non-tensor values (``scalars``)."""
    import torch
    flat = {f"{i}/{k}": v for i, s in state_dict["state"].items() for k, v in s.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in flat.items() if torch.is_tensor(v)}
    return tensors, {"param_groups": state_dict["param_groups"],
                     "scalars": {k: v for k, v in flat.items() if not torch.is_tensor(v)}}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    """The ``state_dict()`` that ``flatten_optimizer`` took apart, for ``load_state_dict``."""
    state: dict = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        i, k = key.split("/", 1)
        state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_optimizer(optimizer, folder: Path) -> None:
    """``optimizer.safetensors`` + ``optimizer.json``."""
    from safetensors.torch import save_file
    tensors, meta = flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json(folder / "optimizer.json", meta)


def load_optimizer(optimizer, folder: Path) -> None:
    """Restore what ``save_optimizer`` wrote (torch moves the state to each parameter's device)."""
    from safetensors.torch import load_file
    if not (folder / "optimizer.safetensors").is_file():
        raise ConfigError(f"{folder}: no optimizer.safetensors, so not a checkpoint this adapterkit wrote "
                          "(an older one's optimizer.pt is a pickle, which it does not read); start "
                          "the run again without train.resume_from")
    optimizer.load_state_dict(unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                                  _read_json(folder / "optimizer.json")))


def rng_states(cuda_all: bool = False) -> tuple[dict, dict]:
    """This process's RNG states as (tensors, JSON): torch CPU and CUDA (every device's when
    ``cuda_all``, as a distributed run keeps them), python's ``random`` and numpy's."""
    import random

    import numpy as np
    import torch
    tensors = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states = torch.cuda.random.get_rng_state_all() if cuda_all else [torch.cuda.random.get_rng_state()]
        tensors.update({f"cuda/{i}": s for i, s in enumerate(states)})
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(key.astype(np.int64))  # uint32 values, exact in int64
    meta = {"python": [version, list(internal), gauss], "cuda_all": cuda_all,
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def set_rng_states(tensors: dict, meta: dict) -> None:
    """Restore what ``rng_states`` returned."""
    import random

    import numpy as np
    import torch
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if meta["cuda_all"]:
            torch.cuda.random.set_rng_state_all(cuda)
        else:
            torch.cuda.random.set_rng_state(cuda[0])


def rng_name(process_index: int, world_size: int) -> str:
    """``rng_state`` (one process) or ``rng_state_<rank>`` (each process of a distributed run)."""
    return "rng_state" if world_size <= 1 else f"rng_state_{process_index}"


def save_rng(folder: Path, name: str, cuda_all: bool = False) -> None:
    """``<name>.safetensors`` + ``<name>.json``: ``rng_states``."""
    from safetensors.torch import save_file
    tensors, meta = rng_states(cuda_all)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
    _write_json(folder / f"{name}.json", meta)


def load_rng(folder: Path, name: str) -> bool:
    """Restore what ``save_rng`` wrote; False when the checkpoint has no such files."""
    from safetensors.torch import load_file
    if not (folder / f"{name}.safetensors").is_file():
        return False
    set_rng_states(load_file(str(folder / f"{name}.safetensors")), _read_json(folder / f"{name}.json"))
    return True


def save_state_dict_json(obj, path: Path) -> None:
    """A scheduler's or loss scaler's ``state_dict()`` (numbers and lists) as JSON."""
    _write_json(path, obj.state_dict())


def load_state_dict_json(obj, path: Path) -> bool:
    """Restore what ``save_state_dict_json`` wrote; False when there is no such file."""
    if not path.is_file():
        return False
    obj.load_state_dict(_read_json(path))
    return True
