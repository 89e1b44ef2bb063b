"""One process or several (``accelerate launch``, torchrun): the device this process trains
on, whether it is the process that writes files, and the few collective steps the stages need.
Every stage asks here; nothing else reads ``LOCAL_RANK`` or builds a ``PartialState``.

    accelerate launch --config_file "$(adapterkit accelerate ddp)" --num_processes 2 -m adapterkit sft tiny_sft

Without a launcher, everything here is the one-process answer (device ``cuda`` or ``cpu``,
main process, no-op collectives). Under a launcher, accelerate's ``PartialState`` sets up the
process group: NCCL on GPUs (each process on ``cuda:<local rank>``), gloo on CPU.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def launched() -> bool:
    """True in a process started by a distributed launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def sharded() -> str | None:
    """``fsdp`` or ``zero3`` when ``accelerate launch`` shards the model's parameters over the
    processes (its FSDP or DeepSpeed ZeRO-3 config), else None: then the base loads without a
    device map (the launcher places the shards) and stores its 4-bit weights in the compute
    dtype (``quant.storage_dtype``)."""
    name = engine()
    if name == "deepspeed":
        return "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else None
    return name


def engine() -> str | None:
    """``fsdp`` or ``deepspeed`` under those ``accelerate launch`` configs, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def quiet_rank() -> bool:
    """True in every process of a distributed run but the first: it logs errors only. Read from
    the launcher's environment, so nothing is initialised (the CLI asks before parsing a recipe)."""
    return launched() and os.environ.get("RANK", "0") != "0"


@functools.lru_cache(maxsize=1)
def state():
    """accelerate's ``PartialState`` (a process-wide singleton), for CPU when there is no CUDA
    (gloo between processes); built once, before any trainer or ``Accelerator`` is."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def device() -> str:
    """This process's device: ``cuda:<local rank>`` under a multi-GPU launch, ``cuda`` or ``cpu``
    alone. Every stage loads its base here (``base.default_device``)."""
    if not launched():
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(state().device)


def is_main() -> bool:
    """True in the process that writes adapters, manifests, plots, checkpoints and registry
    entries (the only one without a launcher)."""
    return not launched() or state().is_main_process


def num_processes() -> int:
    return state().num_processes if launched() else 1


def barrier() -> None:
    """Wait until every process gets here (nothing alone)."""
    if launched():
        state().wait_for_everyone()


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (e.g. builds the tiny default), then the others,
    which find its files there."""
    if not launched():
        yield
        return
    with state().main_process_first():
        yield


def tensor_sum(x: torch.Tensor) -> torch.Tensor:
    """A tensor's element-wise sum over the processes (a detached copy; itself alone)."""
    if not launched():
        return x.detach().clone()
    from accelerate.utils import reduce
    return reduce(x.detach().clone(), "sum")


def global_sum():
    """``tensor_sum`` under a launch, None alone: what ``losses.masked_whiten(all_sum=...)``
    takes to whiten over every process's tokens (alone it keeps its own one-batch path)."""
    return tensor_sum if launched() else None


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the processes (the values themselves alone), in float64."""
    if not launched():
        return list(values)
    return tensor_sum(torch.tensor(values, dtype=torch.float64, device=state().device)).tolist()


def mean(value: float) -> float:
    """The mean over the processes of a per-process number (a training loss)."""
    return all_sum([value])[0] / num_processes()


# -- the shipped accelerate configs (adapterkit/accelerate/*.yaml) --------------------------------

def launch_configs() -> dict[str, tuple[str, Path]]:
    """Shipped ``accelerate launch --config_file`` files: name -> (first comment line, path)."""
    folder = Path(__file__).parent / "accelerate"
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        out[path.stem] = (first, path)
    return out


def launch_config(name: str) -> Path:
    """The path of the shipped config ``name`` (``ddp``, ``fsdp_qlora``, ...)."""
    from adapterkit.errors import ConfigError
    configs = launch_configs()
    if name not in configs:
        raise ConfigError(f"no shipped accelerate config {name!r}; known: {', '.join(configs)}")
    return configs[name][1]
