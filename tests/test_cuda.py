"""Every stage, a stacked reload and the quickstart on a real GPU, in the compute dtype
``auto`` picks there (bf16 on Ampere and later); skipped where there is no CUDA.

A few steps each: the loss is finite, the LoRA weights moved and stayed fp32 (master weights),
the 4-bit base did not move, the 4-bit layers compute in bf16, and everything sits on the GPU.
"""
import json
import math

import pytest
import torch

from adapterkit.config import load_config
from helpers import load_nf4

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUICK = ["train.progress=false", "train.max_steps=3"]


def expected_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def quantized(model):
    import bitsandbytes as bnb
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def split_state(model, trainable: str = "lora_"):
    """(copies of the frozen base tensors, copies of the LoRA tensors whose name holds ``trainable``)."""
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and trainable in n}
    return base, lora


def check_trained(model, before: tuple[dict, dict]) -> None:
    """The base as it was, some trainable LoRA weights moved, all of them fp32, all on the GPU;
    the 4-bit layers on the GPU computing in the dtype ``auto`` resolved."""
    base, lora = before
    params = dict(model.named_parameters())
    assert base and all(torch.equal(params[n], v) for n, v in base.items())
    assert lora and any(not torch.equal(params[n], v) for n, v in lora.items())
    assert all(params[n].dtype == torch.float32 for n in lora)  # master weights (keep_adapters_fp32)
    assert all(p.device.type == "cuda" for p in params.values())
    layers = quantized(model)
    assert layers and all(m.weight.device.type == "cuda" and m.compute_dtype == expected_dtype() for m in layers)


def test_sft_on_cuda(tiny_dir, tmp_path):
    from adapterkit.stages.sft import finish as finish_sft, setup as setup_sft
    config = load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'sft'}", *QUICK, "data.eval=null",
                                              "train.gradient_checkpointing=true"])
    assert config.base.compute_dtype == "auto"
    run = setup_sft(config)
    assert run.trainer.args.bf16 == (expected_dtype() == torch.bfloat16)
    before = split_state(run.trainer.model)
    result = run.trainer.train()
    assert math.isfinite(result.training_loss)
    check_trained(run.trainer.model, before)
    record = finish_sft(run, result)
    assert record.manifest["base"]["compute_dtype"] == str(expected_dtype()).removeprefix("torch.")
    assert record.manifest["recipe"]["base"]["compute_dtype"] == "auto"


def test_reward_on_cuda(tiny_dir, tmp_path):
    """Training and the held-out scoring that used to build its batches on the CPU."""
    from safetensors.torch import load_file
    from adapterkit.scorer import RewardScorer
    from adapterkit.stages.reward import train_reward
    record = train_reward(load_config("reward", "tiny_reward", [f"output.dir={tmp_path / 'rm'}", *QUICK]))
    m = record.metrics
    assert math.isfinite(m["train_loss"]) and 0 <= m["eval_accuracy"] <= 1 and math.isfinite(m["eval_margin"])
    weights = load_file(str(record.path / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero
    assert all(v.dtype == torch.float32 for v in weights.values())
    scorer = RewardScorer.load(record.path)
    assert scorer.head.device.type == "cuda"
    rows = [json.loads(line) for line in open(tiny_dir / "data" / "preferences_eval.jsonl")][:8]
    chosen, rejected = scorer.score_pairs(rows)
    assert len(chosen) == 8 and all(map(math.isfinite, chosen + rejected))


def test_dpo_on_cuda_and_the_stack_reloads(sft_adapter, tiny_dir, tmp_path):
    """A few DPO steps on the SFT parent, then the saved adapter stacked on its parent with
    vanilla transformers + peft gives the trained model's logits (within bf16 rounding)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from adapterkit.evaluate import completion_batches
    from adapterkit.stages.dpo import finish as finish_dpo, setup as setup_dpo
    from adapterkit.tokens import model_device
    config = load_config("dpo", "tiny_dpo", [
        f"output.dir={tmp_path / 'dpo'}", *QUICK, f"dpo.parent={json.dumps([str(sft_adapter.path)])}",
        "data.train=tiny:preferences_eval", "data.eval=null", "dpo.prompts=null", "train.learning_rate=1e-2"])
    run = setup_dpo(config)
    model = run.trainer.model
    before = split_state(model, ".default.")
    parent = {n: p.detach().clone() for n, p in model.named_parameters() if ".parent0." in n}
    result = run.trainer.train()
    assert math.isfinite(result.training_loss)
    check_trained(model, before)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in parent.items())
    rows = [json.loads(line) for line in open(tiny_dir / "data" / "preferences_eval.jsonl")][:8]
    ids, mask, _ = next(completion_batches(run.trainer.processing_class, [r["prompt"] for r in rows],
                                           [r["chosen"] for r in rows], 8, model_device(model)))
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask).logits.float()
    record = finish_dpo(run, result)
    vanilla = PeftModel.from_pretrained(load_nf4(AutoModelForCausalLM, tiny_dir / "base", prepared=True),
                                        str(sft_adapter.path), adapter_name="sft")
    vanilla.load_adapter(str(record.path), adapter_name="dpo")
    vanilla.base_model.set_adapter(["sft", "dpo"])
    with torch.no_grad():
        reloaded = vanilla.eval()(input_ids=ids, attention_mask=mask).logits.float()
    gap = (reloaded - trained).abs()  # bf16 differences have a heavy tail: held on the mean (helpers.gap)
    assert gap.mean().item() < 5e-2, (gap.mean().item(), gap.max().item())
    vanilla.base_model.set_adapter(["sft"])
    with torch.no_grad():  # and the DPO adapter is what makes the difference, well above the gap
        effect = (vanilla(input_ids=ids, attention_mask=mask).logits.float() - trained).abs().mean().item()
    assert effect > max(4 * gap.mean().item(), 1e-2), (effect, gap.mean().item())


def test_ppo_on_cuda(sft_adapter, reward_adapter, tmp_path):
    from adapterkit.stages.ppo import finish, setup, train
    config = load_config("ppo", "tiny_ppo", [
        f"output.dir={tmp_path / 'ppo'}", "train.progress=false", "train.max_steps=2",
        f"ppo.reward={reward_adapter.path}", f"ppo.parent={json.dumps([str(sft_adapter.path)])}",
        "ppo.rollout_batch_size=8", "train.batch_size=4", "ppo.ppo_epochs=1", "data.eval=null"])
    run = setup(config)
    before = split_state(run.roles.peft, ".policy.")
    train(run)
    assert len(run.history) == 2
    assert all(math.isfinite(v) for h in run.history for v in h.values() if isinstance(v, float))
    check_trained(run.roles.peft, before)
    assert run.roles.value_head.weight.device.type == "cuda"
    record = finish(run)
    assert record.manifest["base"]["compute_dtype"] == str(expected_dtype()).removeprefix("torch.")


def test_quickstart_on_cuda(tmp_path, ak_home):
    from adapterkit.quickstart import run_quickstart
    summary = run_quickstart(tmp_path / "qs", progress=False)
    stages = summary["stages"]
    assert set(stages) >= {"base", "sft", "reward", "dpo", "ppo"}
    for stage in ("sft", "dpo", "ppo"):
        assert 0 <= stages[stage]["score"] <= 1, stages[stage]
    assert 0 <= stages["reward"]["accuracy"] <= 1
    manifest = json.loads((tmp_path / "qs" / "sft" / "adapterkit.json").read_text())
    assert manifest["base"]["compute_dtype"] == str(expected_dtype()).removeprefix("torch.")
