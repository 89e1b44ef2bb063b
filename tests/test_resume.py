"""Resume for every trainer stage: a run killed with SIGKILL mid-run, resumed from its latest
checkpoint (``train.resume_from=latest``), ends with the very adapter an uninterrupted run of the
same seed ends with (bit for bit on CPU: optimizer, scheduler, RNG and data position are restored)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_close, child_env, event_tags

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 4


def adapterkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapterkit", *args]


def env() -> dict:
    return child_env(OMP_NUM_THREADS="1")


def kill_after_first_checkpoint(stage: str, recipe: str, overrides: list[str], ckpt: Path) -> int:
    """Start the stage in a subprocess; SIGKILL it as soon as one whole checkpoint is on disk.
    Returns the newest whole checkpoint's step."""
    return kill_when_checkpointed([stage, recipe, *overrides, "train.progress=false"], ckpt)


def kill_when_checkpointed(args: list[str], ckpt: Path) -> int:
    """``adapterkit ARGS`` in a subprocess, SIGKILLed as soon as one whole checkpoint is in
    ``ckpt``; returns the newest whole checkpoint's step."""
    from adapterkit.checkpoints import checkpoints, complete, step_of
    proc = subprocess.Popen(adapterkit_cmd(*args), cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not any(complete(p) for p in checkpoints(ckpt)):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return step_of([p for p in checkpoints(ckpt) if complete(p)][-1])


PICKLES = {".pt", ".pth", ".bin", ".pkl", ".pickle"}
TEXT = {".json", ".safetensors", ".txt", ".model", ".jinja", ".md"}  # + tokenizer and adapter text (README.md)


def assert_no_pickle(checkpoint: Path) -> None:
    """Every file in a checkpoint is safetensors, JSON or tokenizer/adapter text: no torch pickle."""
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())  # DPO: parents' subfolders
    assert {"adapter_model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "rng_state.safetensors", "rng_state.json", "trainer_state.json"} <= set(files), files
    assert not [f for f in files if Path(f).suffix in PICKLES], files
    assert all(Path(f).suffix in TEXT for f in files), files
    assert "training_args.bin" not in files


def adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


def killed_resumed_and_straight(stage: str, recipe: str, tmp_path: Path, *overrides: str):
    from adapterkit.config import load_config
    from adapterkit.stages import train_stage
    common = [f"train.max_steps={STEPS}", "train.progress=false", *overrides]
    out = tmp_path / "killed"
    killed_at = kill_after_first_checkpoint(stage, recipe, [*common, f"output.dir={out}",
                                                            f"train.save_steps={EVERY}"], Path(f"{out}.checkpoint"))
    assert 0 < killed_at < STEPS and not (out / "adapterkit.json").exists()  # killed mid-run
    assert_no_pickle(Path(f"{out}.checkpoint") / f"checkpoint-{killed_at}")
    resumed = train_stage(stage, load_config(stage, recipe, [*common, f"output.dir={out}", f"train.save_steps={EVERY}",
                                                             "train.resume_from=latest"]))
    straight = train_stage(stage, load_config(stage, recipe, [*common, f"output.dir={tmp_path / 'straight'}"]))
    assert resumed.metrics["steps"] == straight.metrics["steps"] == STEPS
    a, b = adapter_weights(resumed.path), adapter_weights(straight.path)
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32  # keep_adapters_fp32 holds after a resume
        assert_close(a[key], b[key], cpu=0, cuda=1e-3)  # CUDA: bf16 kernels need not be deterministic
    return resumed, straight


def test_sft_killed_then_resumed_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    killed_resumed_and_straight("sft", "tiny_sft", tmp_path, "data.eval=null")


def test_reward_killed_then_resumed_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    resumed, straight = killed_resumed_and_straight("reward", "tiny_reward", tmp_path, "data.eval=null")
    assert any("score" in k for k in adapter_weights(resumed.path))  # the head is restored and saved too


def test_dpo_killed_then_resumed_equals_an_uninterrupted_run(sft_adapter, tmp_path):
    resumed, _ = killed_resumed_and_straight("dpo", "tiny_dpo", tmp_path, "data.eval=null", "dpo.prompts=null",
                                             f"dpo.parent={json.dumps([str(sft_adapter.path)])}")
    parent = adapter_weights(sft_adapter.path)  # the frozen parent is untouched by the resume
    # paths in a manifest are relative to the artifact (issue 12): the parent is the same folder
    assert (resumed.path / resumed.manifest["parent"][0]["path"]).resolve() == sft_adapter.path.resolve()
    assert parent


def test_checkpoints_rotate_and_resume_from_names_a_folder(tiny_dir, tmp_path):
    from adapterkit.checkpoints import checkpoints, resolve_resume
    from adapterkit.config import load_config
    from adapterkit.errors import ConfigError
    from adapterkit.stages.sft import train_sft
    out = tmp_path / "sft"
    train_sft(load_config("sft", "tiny_sft", [f"output.dir={out}", "train.max_steps=6", "train.save_steps=2",
                                              "train.save_total_limit=2", "train.progress=false", "data.eval=null"]))
    kept = checkpoints(Path(f"{out}.checkpoint"))
    assert [p.name for p in kept] == ["checkpoint-4", "checkpoint-6"]  # the last N, oldest removed
    assert (kept[-1] / "adapter_model.safetensors").is_file()
    assert resolve_resume("latest", Path(f"{out}.checkpoint")) == kept[-1]
    assert resolve_resume(str(kept[0]), Path("/nowhere")) == kept[0]
    with pytest.raises(ConfigError, match="train.resume_from"):  # before any model loads
        from adapterkit.preflight import preflight
        preflight(load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'other'}", "train.resume_from=latest"]))


def test_a_checkpoint_is_safetensors_and_json_and_restores_the_optimizer_it_saved(tiny_dir, tmp_path):
    """The optimizer (AdamW's exp_avg, exp_avg_sq, step), scheduler and RNG a checkpoint holds are
    the trainer's at the save, and a resumed trainer starts from exactly those."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from adapterkit.config import load_config
    from adapterkit.stages import sft

    def clone(state_dict):
        return {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                for i, s in state_dict["state"].items()}

    class Capture(TrainerCallback):
        def __init__(self, event):
            self.event, self.seen = event, {}

        def capture(self, state, optimizer, lr_scheduler):
            self.seen.setdefault(state.global_step, (clone(optimizer.state_dict()), lr_scheduler.state_dict(),
                                                     torch.random.get_rng_state()))

        def on_save(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            if self.event == "save":
                self.capture(state, optimizer, lr_scheduler)

        def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            if self.event == "step_begin":
                self.capture(state, optimizer, lr_scheduler)

    out = tmp_path / "sft"
    common = [f"output.dir={out}", "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=3",
              "train.progress=false", "data.eval=null"]
    first = sft.setup(load_config("sft", "tiny_sft", common))
    saved = Capture("save")
    first.trainer.add_callback(saved)
    sft.train(first)
    checkpoint = Path(f"{out}.checkpoint") / "checkpoint-2"
    assert_no_pickle(checkpoint)
    optimizer, scheduler, _ = saved.seen[2]
    on_disk = load_file(str(checkpoint / "optimizer.safetensors"))
    assert {k.split("/", 1)[1] for k in on_disk} == {"exp_avg", "exp_avg_sq", "step"}  # AdamW
    assert len(on_disk) == 3 * len(optimizer) and optimizer
    for i, state in optimizer.items():  # the file holds the trainer's state at the save
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(on_disk[f"{i}/{name}"], state[name].cpu())
    assert json.loads((checkpoint / "scheduler.json").read_text()) == json.loads(json.dumps(scheduler))

    resumed = sft.setup(load_config("sft", "tiny_sft", [*common, f"train.resume_from={checkpoint}"]))
    begun = Capture("step_begin")
    resumed.trainer.add_callback(begun)
    sft.train(resumed)
    restored, restored_scheduler, _ = begun.seen[2]  # before the first step after the checkpoint
    assert restored.keys() == optimizer.keys()
    for i, state in optimizer.items():  # the resumed trainer's optimizer is the one saved
        assert restored[i].keys() == state.keys()
        for name, value in state.items():
            assert torch.equal(restored[i][name].cpu(), value.cpu()), (i, name)
    assert restored_scheduler == scheduler
    assert (resumed.trainer.optimizer.state_dict()["param_groups"][0]["lr"]
            == first.trainer.optimizer.state_dict()["param_groups"][0]["lr"])  # the same schedule to the end


def test_rng_state_round_trips_through_safetensors_and_json(tmp_path):
    import random

    import numpy as np

    from adapterkit.checkpoints import load_rng, save_rng
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save_rng(tmp_path, "rng_state")
    expected = random.random(), np.random.rand(), torch.rand(2)
    random.random(), np.random.rand(), torch.rand(5)
    assert load_rng(tmp_path, "rng_state")
    got = random.random(), np.random.rand(), torch.rand(2)
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    assert not load_rng(tmp_path, "rng_state_1")  # no such files: False, nothing restored


# -- tracking ------------------------------------------------------------------------------------

def test_report_to_tensorboard_logs_the_trainer_stages(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from adapterkit.config import load_config
    from adapterkit.stages.sft import train_sft
    out = tmp_path / "sft"
    train_sft(load_config("sft", "tiny_sft", [f"output.dir={out}", "train.max_steps=4", "train.logging_steps=1",
                                              "train.eval_steps=2", "train.report_to=tensorboard",
                                              "train.progress=false"]))
    tags = event_tags(Path(f"{out}.logs"))  # beside the adapter, not in the scratch folder
    assert {"train/loss", "eval/loss"} <= tags


def test_report_to_is_checked_before_the_model_loads(tmp_path):
    from adapterkit.config import load_config
    from adapterkit.errors import ConfigError
    from adapterkit.preflight import preflight
    with pytest.raises(ConfigError, match="train.report_to=nosuch: unknown tracker"):
        preflight(load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'x'}", "train.report_to=nosuch"]))
