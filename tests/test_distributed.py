"""Several processes: `accelerate launch` with the shipped DDP config and 2 processes on CPU
(torchrun underneath, gloo between the processes) runs SFT, DPO and PPO on the tiny default.

Each 2-process run must equal a 1-process run with the same global batch (2 x 8 rows against
1 x 16; PPO 2 x 16 rollouts against 1 x 32) and write exactly one adapter, one manifest and
one registry entry. Tolerance: the adapters' weights within a relative L2 distance of 1e-3,
the losses within 1e-4 relative. Why not bit for bit: gloo adds the two processes' gradients
in another order than one process sums its batch (float32 addition is not associative:
~1e-7 relative per step), and AdamW's m / sqrt(v) turns that into whole-step differences on
the few weights whose gradient is near 0. Observed: SFT 6e-5, DPO 2e-7, PPO 2e-5.

The shipped configs (``adapterkit accelerate``) load and validate with accelerate's own
config class; the DeepSpeed ones structurally (deepspeed is not installed here).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import child_env
from tests.conftest import load_jsonl

WEIGHTS_REL = 1e-3
LOSS_REL = 1e-4
# The three 2-process runs are marked slow: 100-145 s together on 2 busy CPU cores (plus the
# session's tiny base and SFT adapter). `slow` tests run by default, in .ci/run too.
# They are CPU tests (gloo, fp32 on both sides): where CUDA is visible the launched ranks
# would each take a GPU (rank 1 has none on a one-GPU machine) and the in-process reference
# would run in bf16, so they skip there.
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="CPU test: 2 gloo processes against 1 in fp32 (CUDA would put ranks on GPUs)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cwd: Path, stage: str, recipe: str, *overrides: str) -> dict:
    """``accelerate launch --config_file ddp.yaml --num_processes 2 -m adapterkit ...``: its
    one JSON document, and how long it took."""
    from adapterkit.distributed import launch_config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config("ddp")),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "adapterkit", stage, recipe, *overrides, "--json", "--quiet"]
    env = child_env(OMP_NUM_THREADS="1")  # 2 processes on 2 cores
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)  # exactly one document: only the main process reports
    out["wall_s"] = time.perf_counter() - start
    return out


def one_process(stage: str, recipe: str, *overrides: str):
    from adapterkit import train
    return train(stage, recipe, [*overrides, "train.progress=false"])


def weights(path) -> torch.Tensor:
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors)])


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def check_one_artifact(tmp: Path, out: dict, published: str) -> None:
    """One adapter folder with one manifest, nothing left beside it, one registry entry."""
    from adapterkit.registry import Registry
    two = Path(out["adapter"])
    assert sorted(p.name for p in (tmp / "two").parent.iterdir()) == ["reg", "two"]  # no .tmp- leftovers
    assert [p.name for p in two.glob("adapterkit.json")] == ["adapterkit.json"]
    entries = Registry.open(tmp / "reg").list()
    assert [(e.name, e.version) for e in entries] == [(published, 1)]


def two_against_one(tmp_path, stage: str, common: list[str], name: str):
    """The stage in 2 processes of batch 8 (published as ``name``) and in 1 of batch 16: the
    two results, the weights' relative distance; exactly one artifact and registry entry."""
    (tmp_path / "a").mkdir()
    out = launch(tmp_path / "a", stage, f"tiny_{stage}", *common, "train.batch_size=8",
                 f"output.dir={tmp_path / 'a' / 'two'}", "--publish", name, "--registry", str(tmp_path / "a" / "reg"))
    one = one_process(stage, f"tiny_{stage}", *common, "train.batch_size=16", f"output.dir={tmp_path / 'one'}")
    distance = relative(weights(out["adapter"]), weights(one.path))
    print(f"{stage} 2 processes: {out['wall_s']:.1f} s, weights {distance:.2g}, "
          f"loss {relative(out['metrics']['train_loss'], one.metrics['train_loss']):.2g}")
    check_one_artifact(tmp_path / "a", out, name)
    assert relative(out["metrics"]["train_loss"], one.metrics["train_loss"]) < LOSS_REL
    return out, one, distance


@pytest.mark.slow
@CPU_ONLY
def test_sft_on_two_processes_equals_one(tiny_dir, tmp_path):
    out, one, distance = two_against_one(tmp_path, "sft", ["train.max_steps=4", "data.eval=null"], "sft2")
    assert out["metrics"]["steps"] == one.metrics["steps"] == 4
    assert distance < WEIGHTS_REL, distance  # (a launch that started one process would train on half the rows)


@pytest.mark.slow
@CPU_ONLY
def test_dpo_on_two_processes_equals_one(sft_adapter, tmp_path):
    # dpo.sft_weight=0: trl's RPO term is a token mean over each process's batch (see README)
    _, _, distance = two_against_one(tmp_path, "dpo", ["train.max_steps=3", "dpo.sft_weight=0", "dpo.prompts=null",
                                                       "data.eval=null", f"dpo.parent=[{sft_adapter.path}]"], "dpo2")
    assert distance < WEIGHTS_REL, distance


@pytest.mark.slow
@CPU_ONLY
def test_ppo_on_two_processes_equals_one(sft_adapter, tmp_path):
    """Same rollouts (row-seeded sampling), rewards and advantages whitened over the global
    batch, token-weighted losses, and one held-out score every process agrees on."""
    (tmp_path / "a").mkdir()
    common = ["train.max_steps=2", f"ppo.parent=[{sft_adapter.path}]", "ppo.reward=adapterkit.tiny:reward",
              "ppo.kl_coef=0.02", "ppo.ppo_epochs=1", "train.grad_accum=1", "ppo.eval_every=1",
              "ppo.keep_best=false"]
    out = launch(tmp_path / "a", "ppo", "tiny_ppo", *common, "ppo.rollout_batch_size=16", "train.batch_size=16",
                 f"output.dir={tmp_path / 'a' / 'two'}", "--publish", "ppo2", "--registry", str(tmp_path / "a" / "reg"))
    one = one_process("ppo", "tiny_ppo", *common, "ppo.rollout_batch_size=32", "train.batch_size=32",
                      f"output.dir={tmp_path / 'one'}")
    distance = relative(weights(out["adapter"]), weights(one.path))
    print(f"ppo 2 processes: {out['wall_s']:.1f} s, weights {distance:.2g}")
    check_one_artifact(tmp_path / "a", out, "ppo2")
    two_log, one_log = load_jsonl(Path(out["adapter"]) / "ppo_log.jsonl"), load_jsonl(one.path / "ppo_log.jsonl")
    for a, b in zip(two_log, one_log, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)  # the same samples
        assert a["response_length"] == b["response_length"]
        for key in ("kl", "entropy", "value_loss"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_REL, abs=1e-5), key
    two_manifest = json.loads((Path(out["adapter"]) / "adapterkit.json").read_text())
    assert [e["step"] for e in two_manifest["evals"]] == [e["step"] for e in one.manifest["evals"]] == [0, 1, 2]
    for a, b in zip(two_manifest["evals"], one.manifest["evals"]):
        assert a["eval_score"] == pytest.approx(b["eval_score"], abs=1e-6)
    assert distance < WEIGHTS_REL, distance


# -- the shipped configs ----------------------------------------------------------------------------

DEEPSPEED_KEYS = {"zero_stage", "gradient_accumulation_steps", "gradient_clipping", "offload_optimizer_device",
                  "offload_param_device", "zero3_init_flag", "zero3_save_16bit_model"}


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs_load_and_validate(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType
    from adapterkit.distributed import launch_config, launch_configs
    assert name in launch_configs()
    config = ClusterConfig.from_yaml_file(launch_config(name))  # refuses unknown keys
    expected = {"single_gpu": DistributedType.NO, "ddp": DistributedType.MULTI_GPU, "fsdp_qlora": DistributedType.FSDP,
                "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}[name]
    assert config.distributed_type == expected and config.mixed_precision == "no" and not config.use_cpu
    if name == "fsdp_qlora":
        # against accelerate's own lists of values (its FSDP plugin needs a GPU to be built, and
        # building it sets FSDP_* variables in this process's environment)
        from accelerate.utils import constants
        fsdp = config.fsdp_config
        assert fsdp["fsdp_auto_wrap_policy"] in constants.FSDP_AUTO_WRAP_POLICY
        assert fsdp["fsdp_backward_prefetch"] in constants.FSDP_BACKWARD_PREFETCH
        assert fsdp["fsdp_sharding_strategy"] in constants.FSDP_SHARDING_STRATEGY
        assert fsdp["fsdp_state_dict_type"] in constants.FSDP_STATE_DICT_TYPE
        # the FSDP-QLoRA recipe: rank 0 loads, the others get the weights synced; flat parameters
        assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]
        assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_version"] == 1
    if name.startswith("deepspeed"):  # deepspeed is not installed here: its keys, checked by hand
        ds = config.deepspeed_config
        assert set(ds) <= DEEPSPEED_KEYS and ds["zero_stage"] == int(name[-1])
        assert ds["offload_optimizer_device"] in ("none", "cpu", "nvme")
        assert ds.get("zero3_init_flag", False) == (ds["zero_stage"] == 3)


def test_quant_storage_follows_the_compute_dtype_when_sharded(monkeypatch):
    """FSDP-QLoRA: the packed 4-bit weights are stored in the compute dtype under FSDP and
    ZeRO-3 launches (what accelerate launch sets in the environment), uint8 otherwise."""
    from adapterkit import quant
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert quant.storage_dtype("auto", torch.bfloat16) == torch.uint8
    assert quant.bnb_config("nf4", torch.bfloat16, quant_storage=torch.uint8).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quant.storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert quant.storage_dtype("float32", torch.bfloat16) == torch.float32  # an explicit key wins
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert quant.storage_dtype("auto", torch.float16) == torch.uint8
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert quant.storage_dtype("auto", torch.float16) == torch.float16


def test_ppo_under_fsdp_or_deepspeed_is_refused_before_loading(monkeypatch, tmp_path):
    from adapterkit.config import load_config
    from adapterkit.errors import ConfigError
    from adapterkit.preflight import check_training
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = load_config("ppo", "tiny_ppo", [f"output.dir={tmp_path / 'x'}", "ppo.reward=adapterkit.tiny:reward"])
    with pytest.raises(ConfigError, match="ppo under accelerate's fsdp config"):
        check_training(config)
