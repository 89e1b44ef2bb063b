"""DPO stage: the reference is the parent stack, step 0 is neutral, training moves held-out
preferences and greedy answers the right way, and the saved adapter stacks back on disk."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import load_jsonl
from helpers import DEVICE, assert_close, load_nf4, tol


def dpo_config(sft_adapter, out, *overrides):
    from adapterkit.config import load_config
    return load_config("dpo", "tiny_dpo", [f"output.dir={out}", "train.progress=false",
                                           f"dpo.parent={json.dumps([str(sft_adapter.path)])}", *overrides])


def first_batch(trainer, n: int = 8) -> dict:
    from adapterkit.tokens import to_device
    return to_device(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]), trainer.model)


def vanilla_stack(tiny_dir, adapters: dict):
    """base (4-bit, as trained) + named adapters, all active, loaded with plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = load_nf4(AutoModelForCausalLM, tiny_dir / "base", prepared=True)
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    model.base_model.set_adapter(list(adapters))
    return model.eval()


# -- the main run: the shipped recipe on the session's SFT adapter ------------------------------------

@pytest.fixture(scope="module")
def dpo_run(sft_adapter, tmp_path_factory):
    from adapterkit.stages.dpo import setup as setup_dpo
    return setup_dpo(dpo_config(sft_adapter, tmp_path_factory.mktemp("dpo") / "adapter"))


@pytest.fixture(scope="module")
def reference_before(dpo_run):
    """Reference log-probs of the first training pairs, before any update."""
    trainer = dpo_run.trainer
    return [t.clone() for t in trainer.compute_ref_log_probs(trainer.model, first_batch(trainer))]


@pytest.fixture(scope="module")
def trained(dpo_run, reference_before, tiny_dir):
    """Train, keep the trained model's logits on a probe batch, then evaluate and save."""
    from adapterkit.evaluate import completion_batches
    from adapterkit.stages.dpo import finish as finish_dpo
    trainer = dpo_run.trainer
    result = trainer.train()
    rows = load_jsonl(tiny_dir / "data" / "preferences_eval.jsonl")[:8]
    ids, mask, _ = next(completion_batches(trainer.processing_class, [r["prompt"] for r in rows],
                                           [r["chosen"] for r in rows], 8, DEVICE))
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits
    record = finish_dpo(dpo_run, result)
    return record, (ids, mask, logits)


def test_reference_is_the_parent_stack_not_the_base(dpo_run, reference_before, sft_adapter, tiny_dir):
    from adapterkit.evaluate import completion_logps
    trainer = dpo_run.trainer
    rows = load_jsonl(tiny_dir / "data" / "preferences.jsonl")[:8]  # the rows of first_batch
    prompts, chosen = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    sft = vanilla_stack(tiny_dir, {"sft": sft_adapter.path})
    parent = completion_logps(sft, trainer.processing_class, prompts, chosen)
    with sft.disable_adapter():
        bare = completion_logps(sft, trainer.processing_class, prompts, chosen)
    ref_chosen = reference_before[0].float().cpu()
    assert_close(ref_chosen, parent, cpu=1e-4, cuda=0.1)  # GPU: trl's autocast vs plain bf16 eval
    assert (ref_chosen - bare).abs().max() > 0.1  # the bare base is a different reference


def test_loss_and_rewards_after_training(trained, dpo_run, reference_before):
    record, _ = trained
    m = record.metrics
    for key in ("train_rewards_chosen", "train_rewards_rejected", "train_rewards_margins",
                "train_rewards_accuracies"):
        assert math.isfinite(m[key]), key
    assert m["train_rewards_margins"] > 0 and m["eval_margin"] > 0
    # the reference stayed the frozen parent through training
    trainer = dpo_run.trainer
    after = trainer.compute_ref_log_probs(trainer.model, first_batch(trainer))
    assert all(torch.equal(a, b) for a, b in zip(after, reference_before))


def test_dpo_raises_heldout_preference_accuracy(trained):
    m = trained[0].metrics
    assert m["eval_pref_accuracy"] > m["parent_pref_accuracy"], m
    assert m["eval_reward_accuracy"] > 0.75, m


def test_dpo_beats_its_parent_under_the_ground_truth(trained):
    m = trained[0].metrics
    assert m["score"] > m["parent_score"] + 0.05, m
    assert 0 < m["kl"] < 5, m


def test_parent_weights_are_untouched(trained, dpo_run, sft_adapter):
    from safetensors.torch import load_file
    on_disk = load_file(str(sft_adapter.path / "adapter_model.safetensors"))
    params = dict(dpo_run.trainer.model.named_parameters())
    for key, value in on_disk.items():
        live = params[key.replace(".weight", ".parent0.weight")]
        assert live.dtype == torch.float32 and torch.equal(live, value.to(live.device)), key  # trl's bf16 cast undone
    assert any(p.abs().max() > 0 for n, p in params.items() if ".lora_B.default." in n)


def test_saved_dir_holds_only_the_new_adapter(trained, sft_adapter):
    from safetensors.torch import load_file
    from adapterkit.artifact import sha256_file
    record, _ = trained
    d = record.path
    assert {"adapter_config.json", "adapter_model.safetensors", "adapterkit.json"} <= {p.name for p in d.iterdir()}
    assert not [p for p in d.iterdir() if p.is_dir()]  # PEFT's root layout, no per-adapter folders
    keys = list(load_file(str(d / "adapter_model.safetensors")))
    assert keys and all(".lora_" in k and "parent" not in k and ".default." not in k for k in keys)
    assert len(keys) == len(load_file(str(sft_adapter.path / "adapter_model.safetensors")))
    (parent,) = record.manifest["parent"]
    assert (record.path / parent["path"]).resolve() == sft_adapter.path.resolve()  # relative: no absolute paths
    assert str(record.path.parent) not in (record.path / "adapterkit.json").read_text()
    assert parent["sha256"] == sha256_file(sft_adapter.path / "adapter_model.safetensors")
    assert parent["base_fingerprint"] == record.manifest["base"]["fingerprint"]["id"]
    assert record.manifest["dpo"]["mode"] == "new"


def test_stacked_reload_reproduces_the_trained_logits(trained, sft_adapter, tiny_dir):
    record, (ids, mask, logits) = trained
    model = vanilla_stack(tiny_dir, {"sft": sft_adapter.path, "dpo": record.path})
    with torch.no_grad():
        reloaded = model(input_ids=ids, attention_mask=mask).logits
    assert_close(reloaded, logits, cpu=1e-5, cuda=5e-2)  # GPU: bf16 logits, trained vs reloaded graph
    model.base_model.set_adapter(["sft"])  # and the DPO adapter is what makes the difference
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - logits).abs().max() > 1e-2


# -- step 0, every loss type and both modes, on a small split ------------------------------------------

STEP0 = {  # (overrides, loss at step 0 when the policy equals its reference)
    "sigmoid": ([], math.log(2)),
    "robust": (["dpo.loss_type=robust", "dpo.label_smoothing=0.2"], math.log(2)),
    "ipo": (["dpo.loss_type=ipo"], (1 / (2 * 0.1)) ** 2),  # (h - 1/(2 beta))^2 with h = 0
    "continue": (["dpo.mode=continue"], math.log(2)),
    "precomputed": (["dpo.precompute_ref_logps=true"], math.log(2)),
}


@pytest.mark.parametrize("case", list(STEP0))
def test_step0_policy_equals_reference(case, sft_adapter, tmp_path):
    from adapterkit._compat import trainer_metrics
    from adapterkit.stages.dpo import LOGGED, finish as finish_dpo, setup as setup_dpo
    overrides, expected = STEP0[case]
    run = setup_dpo(dpo_config(sft_adapter, tmp_path / "out", "data.train=tiny:preferences_eval", "data.eval=null",
                               "dpo.prompts=null", "dpo.sft_weight=0", "train.max_steps=2", *overrides))
    trainer = run.trainer
    batch = first_batch(trainer)
    assert ("ref_chosen_logps" in batch) == (case == "precomputed")
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    logged = {k: trainer_metrics(trainer)[k][-1] for k in LOGGED}
    trainer_metrics(trainer).clear()
    assert loss == pytest.approx(expected, abs=tol(cpu=1e-6, cuda=1e-2))
    # GPU: the policy (adapter on, B = 0) and the reference pass run different kernels in bf16
    zero = tol(cpu=0, cuda=1e-2)
    assert all(abs(logged[k]) <= zero for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")), logged
    if case == "continue":  # a trained copy of the parent, recorded as such
        record = finish_dpo(run, trainer.train())
        assert record.manifest["dpo"]["mode"] == "continue"
        assert record.manifest["dpo"]["policy_stack"] == ["default"]
        assert record.manifest["dpo"]["reference_stack"] == ["parent0"]


# -- refusals -------------------------------------------------------------------------------------------

def test_missing_parent_is_named_by_the_cli(sft_adapter, tmp_path, capsys):
    from adapterkit.cli import main
    out = tmp_path / "out"
    assert main(["dpo", "tiny_dpo", f"output.dir={out}", f"dpo.parent=[{tmp_path / 'nope'}]"]) == 2
    assert "nope: no such adapter directory" in capsys.readouterr().err
    assert not out.exists()


def test_parent_from_another_base_is_refused(sft_adapter, tmp_path):
    from adapterkit.errors import CompatibilityError
    from adapterkit.stages.dpo import train_dpo
    other = tmp_path / "other-sft"
    shutil.copytree(sft_adapter.path, other)
    manifest = json.loads((other / "adapterkit.json").read_text())
    manifest["base"]["fingerprint"]["id"] = "0123456789abcdef"
    (other / "adapterkit.json").write_text(json.dumps(manifest))
    with pytest.raises(CompatibilityError, match="other-sft: trained on base 0123456789abcdef"):
        train_dpo(dpo_config(sft_adapter, tmp_path / "out", f"dpo.parent=[{other}]"))
    assert not (tmp_path / "out").exists()
