"""PPO checkpoints: safetensors for tensors, JSON for the rest (no pickle). A resumed run
continues at the step after the checkpoint, with the same optimizer, scheduler, KL
coefficient, evaluations and best policy. They use every stage's keys and layout
(``checkpoints.py``): ``train.save_steps``, ``train.checkpoint_dir``/checkpoint-<step>,
``train.save_total_limit``, ``train.resume_from``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from adapterkit import losses
from adapterkit.artifact import atomic_dir
from adapterkit.checkpoints import PREFIX, flatten_optimizer, rotate, unflatten_optimizer
from adapterkit.errors import DataError
from adapterkit.stages.ppo_model import POLICY, VALUE

if TYPE_CHECKING:
    from adapterkit.stages.ppo import PPORun


def save_checkpoint(run: PPORun) -> None:
    """Policy and value adapters, value head, AdamW state, scheduler, KL coefficient, score
    moments, step."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    if not run.accelerator.is_main_process:
        return
    root = run.config.checkpoint_dir
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(root / f"{PREFIX}{run.step}") as tmp:
        weights = {f"{name}/{k}": v for name in (POLICY, VALUE)
                   for k, v in get_peft_model_state_dict(run.roles.peft, adapter_name=name).items()}
        weights["value_head.weight"] = run.roles.value_head.weight
        if run.best is not None:
            weights.update({f"best/{k}": v for k, v in run.best["weights"].items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  tmp / "adapters.safetensors")
        tensors, optimizer = flatten_optimizer(run.optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        meta = {"step": run.step, "kl_coef": run.kl_ctl.value, "history": run.history, "evals": run.evals,
                "best": None if run.best is None else {k: run.best[k] for k in ("step", "eval_score")},
                "param_groups": optimizer["param_groups"], "scheduler": run.scheduler.state_dict(),
                "optimizer_scalars": optimizer["scalars"], "score_moments": run.score_moments.state_dict()}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    rotate(root, run.config.train.save_total_limit)


def load_checkpoint(run: PPORun, path: str | os.PathLike) -> None:
    """Restore what ``save_checkpoint`` wrote; the next step is the one after it."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise DataError(f"{path}: not a PPO checkpoint (no trainer.json)")
    weights = load_file(str(path / "adapters.safetensors"))
    meta = json.loads((path / "trainer.json").read_text())
    for name in (POLICY, VALUE):
        set_peft_model_state_dict(run.roles.peft, {k.split("/", 1)[1]: v for k, v in weights.items()
                                                   if k.startswith(f"{name}/")}, adapter_name=name)
    run.roles.value_head.weight.data.copy_(weights["value_head.weight"])
    run.optimizer.load_state_dict(unflatten_optimizer(
        load_file(str(path / "optimizer.safetensors")),
        {"param_groups": meta["param_groups"], "scalars": meta["optimizer_scalars"]}))
    run.scheduler.load_state_dict(meta["scheduler"])
    run.kl_ctl.value, run.step, run.history = meta["kl_coef"], meta["step"], meta["history"]
    run.evals = meta.get("evals", [])
    run.score_moments = losses.RunningMoments(**meta.get("score_moments", {}))
    if meta.get("best") is not None:
        run.best = {**meta["best"], "weights": {k.split("/", 1)[1]: v for k, v in weights.items()
                                                 if k.startswith("best/")}}
