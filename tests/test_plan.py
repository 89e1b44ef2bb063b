"""``adapterkit plan``: the memory model (``memory.py``) against measured peaks, and its CLI.

The measured peak is that of allocated tensor bytes during two real training steps of the
stage (``memcheck.measure_stage``: on CPU torch's profiler allocation events, on CUDA
``torch.cuda.max_memory_allocated``), and the plan is asked for the shapes the steps really
had. Rows of different lengths, so batches are padded as real data is.
"""
from __future__ import annotations

import json

import pytest

from adapterkit.cli import main
from adapterkit.config import load_config
from adapterkit.errors import AdapterkitError
from adapterkit.memory import GiB, Arch, largest_batch, parse_gpu, per_gpu, per_gpu_table, plan
from tests.helpers import DEVICE

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """SFT rows and preference pairs of 5 to 60 answer words: padded batches, some truncated."""
    from adapterkit.memcheck import padded_task_data
    return padded_task_data(tmp_path_factory.mktemp("plan-data"))


def check(config) -> tuple[float, object, object]:
    """(relative error of the plan, measurement, plan) for two real steps of ``config``."""
    from adapterkit.memcheck import measure_stage
    m = measure_stage(config, steps=2)
    shape = dict(m.shape)
    if config.stage == "ppo":  # planned for the response length the rollouts really had
        config = config.model_copy(update={"ppo": config.ppo.model_copy(update={"max_new_tokens": shape["response_len"]})})
        shape = {"seq_len": shape["prompt_len"]}
    p = plan(config, device=DEVICE.type, **shape)
    return (p.peak_bytes - m.peak_bytes) / m.peak_bytes, m, p


@pytest.mark.parametrize("stage,extra", [
    ("sft", []), ("sft", ["train.gradient_checkpointing=true"]), ("reward", []), ("dpo", [])])
def test_plan_within_15_percent_of_the_measured_peak(stage, extra, long_data, tiny_dir, sft_adapter, tmp_path):
    data = {"sft": [f"data.train={long_data['sft']}"], "reward": [f"data.train={long_data['pairs']}"],
            "dpo": [f"data.train={long_data['pairs']}", f"dpo.parent=[{sft_adapter.path}]", "dpo.prompts=null"]}
    config = load_config(stage, f"tiny_{stage}", [*data[stage], "data.on_long=truncate", "data.max_length=48",
                                                  "train.batch_size=8", f"output.dir={tmp_path / 'out'}", *extra])
    err, m, p = check(config)
    assert m.shape["seq_len"] == 48  # the longest rows were cut to max_length, the others padded
    assert abs(err) <= 0.15, f"{stage} {extra}: plan {p.peak_bytes} vs measured {m.peak_bytes} ({err:+.1%})"
    # before training: base and adapters, and on CPU the dequantization buffer once a forward made it
    weights = p.terms["base"] + p.terms["adapters"]
    assert 0.98 * weights <= m.static_bytes <= 1.02 * (weights + p.terms.get("dequant_buffer", 0)), (weights, m)


def test_plan_ppo_within_15_percent(tiny_dir, sft_adapter, reward_adapter, tmp_path):
    config = load_config("ppo", "tiny_ppo", [f"ppo.parent=[{sft_adapter.path}]", f"ppo.reward={reward_adapter.path}",
                                             "ppo.rollout_batch_size=16", "train.batch_size=8", "ppo.ppo_epochs=1",
                                             "ppo.max_new_tokens=16", "ppo.temperature=1.5",
                                             f"output.dir={tmp_path / 'out'}"])
    err, m, p = check(config)
    assert [a["role"] for a in p.adapters] == ["parent " + str(sft_adapter.path), "policy", "reward",
                                               "value (copy of the reward)"]
    assert abs(err) <= 0.15, f"ppo: plan {p.peak_bytes} vs measured {m.peak_bytes} ({err:+.1%})"


# -- the model's arithmetic, no weights -------------------------------------------------------

@pytest.fixture(scope="module")
def config_only_8b(tmp_path_factory, tiny_dir):
    """An 8B-shaped base that is only a config.json and tokenizer files (no weights)."""
    import shutil
    d = tmp_path_factory.mktemp("llama-8b-config")
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    for f in (tiny_dir / "base").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    return d


def test_plan_of_a_config_only_base(config_only_8b):
    p = plan("tiny_sft", [f"base.name={config_only_8b}", "data.max_length=1024", "train.batch_size=4",
                          "train.gradient_checkpointing=true"], gpu="24GB")
    arch = Arch(**p.arch)
    assert (arch.layers, arch.kv_heads, arch.vocab) == (32, 8, 128256)
    # NF4 linear weights of Llama-3-8B (6.98e9 at ~0.516 byte: 3.35 GiB) + the embeddings and LM head,
    # fp32 after prepare_model_for_kbit_training (2 x 0.525e9 x 4 bytes: 3.91 GiB)
    assert 7.1 * GiB < p.terms["base"] < 7.4 * GiB
    assert p.fits and p.peak_bytes < p.usable_bytes and p.max_batch_size >= 4
    bigger = plan("tiny_sft", [f"base.name={config_only_8b}", "data.max_length=1024",
                               f"train.batch_size={p.max_batch_size + 1}", "train.gradient_checkpointing=true"])
    assert bigger.peak_bytes > p.usable_bytes  # the next batch size really does not fit
    off = plan("tiny_sft", [f"base.name={config_only_8b}", "data.max_length=1024", "train.batch_size=4",
                            "train.gradient_checkpointing=false"])
    assert off.activations == p.activations and off.peak_bytes > p.peak_bytes


def test_parse_gpu():
    assert parse_gpu("24GB") == 24 * 10**9 and parse_gpu("80GB") == 80 * 10**9 and parse_gpu("24GiB") == 24 * GiB
    for bad in ("24", "lots", "24 parsecs"):
        with pytest.raises(AdapterkitError, match="--gpu"):
            parse_gpu(bad)


def test_largest_batch():
    assert largest_batch(lambda b: b <= 37, list(range(1, 100))) == 37
    assert largest_batch(lambda b: False, [1, 2]) == 0
    assert largest_batch(lambda b: b <= 5, [1, 2, 4, 8]) == 4


def test_per_gpu_sharding(config_only_8b):
    p = plan("tiny_dpo", [f"base.name={config_only_8b}", "dpo.parent=[]", "data.max_length=512"])
    one, ddp, fsdp = (per_gpu(p, n, s) for n, s in ((1, "none"), (8, "ddp"), (8, "fsdp")))
    assert one["total"] == p.peak_bytes
    assert ddp["total"] > one["total"] and ddp["ddp_buckets"] == p.terms["gradients"]
    assert fsdp["base"] == -(-p.terms["base"] // 8) and fsdp["optimizer"] == -(-p.terms["optimizer"] // 8)
    assert fsdp["activations"] == one["activations"] and fsdp["total"] < one["total"]
    rows = per_gpu_table({"8B dpo": p}, world_size=4)
    assert [r["setup"] for r in rows] == ["1 GPU", "DDP x4", "FSDP x4"]
    with pytest.raises(AdapterkitError, match="sharding"):
        per_gpu(p, 2, "zero3")


# -- the command -----------------------------------------------------------------------------

def test_cli_plan(config_only_8b, capsys):
    assert main(["plan", "tiny_sft", f"base.name={config_only_8b}", "--gpu", "24GB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stage"] == "sft" and doc["fits"] is not None and doc["peak_bytes"] == sum(doc["terms"].values())
    assert main(["plan", "tiny_ppo", f"base.name={config_only_8b}", "--gpu", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "generation KV cache" in out or "logits" in out
    assert "largest train.batch_size" in out


@pytest.mark.parametrize("argv,message", [
    (["plan", "no_such_recipe"], "no such recipe"),
    (["plan", "tiny_sft", "lora.r=x"], "lora.r"),
    (["plan", "tiny_sft", "--gpu", "24"], "--gpu"),
    (["plan", "tiny_sft", "base.name=nobody/no-such-model"], "config.json")])
def test_cli_plan_errors(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_api_and_readme_commands(tiny_dir, tmp_path, monkeypatch, capsys):
    """``ak.plan`` is the planner, and the README's "Will it fit?" commands run as written."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path
    import adapterkit as ak
    from adapterkit import memory
    assert ak.plan is memory.plan and ak.plan("tiny_reward").stage == "reward"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Will it fit?", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    for line in block.strip().splitlines():
        argv = shlex.split(line.split("  #")[0])
        if argv[0] == "adapterkit":
            assert main(argv[1:]) == 0, line
        else:
            assert argv[0] == "python", line
            subprocess.run([sys.executable, *argv[1:]], check=True)
    out = capsys.readouterr().out
    assert "peak (train)" in out and '"stage": "ppo"' in out  # the tables, then the --json document
    assert (tmp_path / "llama-8b-config" / "config.json").is_file()
