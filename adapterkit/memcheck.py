"""Measure what ``memory.py`` predicts: the peak of allocated tensor bytes while a stage trains.

    from adapterkit.memcheck import measure_stage
    m = measure_stage(config, steps=2)         # a real setup, then `steps` real training steps
    m.peak_bytes, m.shape                      # -> compare with memory.plan(config, **m.shape)

- CUDA: ``torch.cuda.max_memory_allocated`` over the training steps, less what the process
  held before the stage's setup (another model, a test's fixtures), with torch's cuBLAS
  workspaces freed first so that the stage's own are counted in any process.
- CPU: the tensors alive when training starts (every tensor object, each storage once) plus
  the highest running sum of the CPU allocator's allocations and frees during the steps, as
  torch's profiler reports them (``_compat.cpu_allocation_peak``). Not RSS: that includes the
  Python/torch runtime and what the allocator keeps after a free.

The first optimizer step creates AdamW's moments after the backward; the steady-state peak
(moments alive during forward and backward) is the second step's, so measure >= 2 steps.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from adapterkit.config import StageConfig


@dataclass
class Measurement:
    """A measured peak and the shapes the stage really trained at (``plan``'s keyword arguments)."""
    stage: str
    device: str
    peak_bytes: int           # the whole peak: what was alive at the start + the most added
    static_bytes: int         # tensors alive when training started (weights, adapters, ...)
    shape: dict = field(default_factory=dict)  # seq_len (and prompt_len, response_len for PPO)


def live_tensor_bytes(device: str = "cpu") -> int:
    """Bytes of every tensor object alive on ``device``, each storage counted once."""
    import warnings
    gc.collect()
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on a deprecated module attribute warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == device and not obj.is_meta:
            try:
                s = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    return sum(storages.values())


class _Lengths:
    """Records the longest (rows, tokens) batch the backbone's embedding sees in training."""

    def __init__(self, model):
        self.seq_len, self.rows = 0, 0
        emb = model.get_input_embeddings()
        self.handle = emb.register_forward_pre_hook(self.hook)
        self.model = model

    def hook(self, module, args):
        ids = args[0]
        if torch.is_grad_enabled() and ids.dim() == 2:
            self.seq_len, self.rows = max(self.seq_len, ids.shape[1]), max(self.rows, ids.shape[0])


def measure_stage(config: StageConfig, steps: int = 2) -> Measurement:
    """Set the stage up as ``adapterkit <stage>`` does, then train ``steps`` steps (no
    evaluation, nothing saved) and return the peak of allocated tensor bytes and the shapes."""
    from adapterkit import _compat
    from adapterkit.base import default_device
    from importlib import import_module
    config = config.model_copy(deep=True)
    config.train.max_steps = steps
    config.train.save_steps = 0
    config.train.eval_steps = 0
    config.train.progress = False
    config.data.eval = None
    if config.stage == "ppo":
        config.ppo.eval_every, config.ppo.keep_best, config.ppo.patience = 0, False, 0
    stage = import_module(f"adapterkit.stages.{config.stage}")
    device = default_device()
    if device == "cuda":  # count what this stage allocates, not what the process held before it
        gc.collect()
        _compat.clear_cublas_workspaces()  # remade by the stage's first matmuls: counted, as in a fresh process
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
    run = stage.setup(config)
    shape: dict = {}
    if config.stage == "ppo":
        from adapterkit.stages import ppo
        original = ppo.rollout

        def recording(run_, prompts, *a, **kw):
            ro = original(run_, prompts, *a, **kw)
            shape["prompt_len"] = max(shape.get("prompt_len", 0), ro.ids.shape[1] - ro.n_resp)
            shape["response_len"] = max(shape.get("response_len", 0), ro.n_resp)
            return ro
        ppo.rollout = recording
        lengths = None
    else:
        lengths = _Lengths(run.trainer.model)
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            static = torch.cuda.memory_allocated() - held
            torch.cuda.reset_peak_memory_stats()
            stage.train(run)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - held
        else:
            static = live_tensor_bytes("cpu")
            with _compat.cpu_allocation_peak() as added:
                stage.train(run)
            peak = static + added["peak"]
    finally:
        if config.stage == "ppo":
            ppo.rollout = original
        else:
            lengths.handle.remove()
            shape["seq_len"] = lengths.seq_len
    return Measurement(config.stage, device, int(peak), int(static), shape)


WORDS = "hot cold up down big small hard soft high low light dark open closed".split()


def padded_task_data(folder, rows: int = 32, longest: int = 60) -> dict[str, str]:
    """SFT rows (``sft.jsonl``) and preference pairs (``pairs.jsonl``) in the tiny task's words
    whose answers run from 5 to ``longest`` words: batches are padded, as real data's are, and
    with ``data.on_long=truncate`` the longest rows fill ``data.max_length``."""
    import json
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = lambda n, k: " ".join(WORDS[(i * 7 + k) % len(WORDS)] for i in range(n))  # noqa: E731
    span = longest - 4
    user = lambda k: {"role": "user", "content": "flip: " + words(6, k)}  # noqa: E731
    answer = lambda n, k: {"role": "assistant", "content": words(n, k)}  # noqa: E731
    with open(folder / "sft.jsonl", "w") as f:
        for k in range(rows):
            f.write(json.dumps({"messages": [user(k), answer(5 + k * 11 % span, k + 1)]}) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        for k in range(rows):
            f.write(json.dumps({"prompt": [user(k)], "chosen": [answer(5 + k * 11 % span, k + 1)],
                                "rejected": [answer(5 + k * 13 % (span - 6), k + 2)]}) + "\n")
    return {"sft": str(folder / "sft.jsonl"), "pairs": str(folder / "pairs.jsonl")}
