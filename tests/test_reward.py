"""Reward stage: learning on held-out pairs, the head in the artifact, both ways of loading it."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_jsonl
from helpers import DEVICE, assert_close, load_nf4, tol


@pytest.fixture(scope="module")
def eval_pairs(tiny_dir):
    return load_jsonl(tiny_dir / "data" / "preferences_eval.jsonl")


@pytest.fixture(scope="module")
def scorer(reward_adapter):
    """The adapter reloaded from disk as a named LoRA on the causal-LM base."""
    from adapterkit.scorer import RewardScorer
    return RewardScorer.load(reward_adapter.path)


def test_heldout_pairwise_accuracy(reward_adapter):
    m = reward_adapter.metrics
    assert m["eval_accuracy"] >= 0.8, m
    assert m["eval_margin"] > 0.5, m


def test_artifact_carries_the_head_and_only_adapter_weights(reward_adapter, sft_adapter):
    from safetensors.torch import load_file
    d = reward_adapter.path
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in cfg["modules_to_save"]
    keys = list(load_file(str(d / "adapter_model.safetensors")))
    heads = [k for k in keys if k.endswith("score.weight")]
    assert len(heads) == 1, heads
    assert all(".lora_" in k or k in heads for k in keys), keys
    assert (d / "eval_scores.json").is_file() and (d / "adapterkit.json").is_file()
    # a classifier head does not change the base's identity: reward and policy share one fingerprint
    assert (reward_adapter.manifest["base"]["fingerprint"]["id"]
            == sft_adapter.manifest["base"]["fingerprint"]["id"])


def test_round_trip_scores_are_bit_identical(reward_adapter, scorer, eval_pairs):
    """Bit for bit on CPU; on a GPU the scorer (causal-LM backbone in bf16) and the trained
    classifier (fp32 norms after peft's k-bit preparation) round differently."""
    saved = json.loads((reward_adapter.path / "eval_scores.json").read_text())  # the trained model's
    chosen, rejected = scorer.score_pairs(eval_pairs)
    assert_close(chosen, saved["chosen"], cpu=0, cuda=0.1)
    assert_close(rejected, saved["rejected"], cpu=0, cuda=0.1)
    assert len(set(chosen)) > 100  # real scores, not a constant head


def test_vanilla_seqcls_peft_load_gives_same_scores(reward_adapter, tiny_dir, eval_pairs):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from adapterkit.scorer import batch_scores
    from adapterkit.tokens import conversation_ids
    base = str(tiny_dir / "base")
    model = load_nf4(AutoModelForSequenceClassification, base, prepared=True, num_labels=1)  # as the recipe trained it
    model = PeftModel.from_pretrained(model, str(reward_adapter.path)).eval()
    tok = AutoTokenizer.from_pretrained(base)
    seqs = [conversation_ids(tok, p["prompt"], p["chosen"]) for p in eval_pairs]
    forward = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits[:, 0]  # noqa: E731
    got = batch_scores(forward, seqs, tok.pad_token_id, 7, DEVICE)  # other batches, other padding
    saved = json.loads((reward_adapter.path / "eval_scores.json").read_text())["chosen"]
    assert_close(got, saved, cpu=1e-5, cuda=0.1)


def test_scorer_shares_the_policy_base(reward_adapter, sft_adapter, scorer, tiny_dir, eval_pairs):
    """Attached beside a policy adapter, the reward scores as it does alone and leaves the
    policy's outputs and trainable flags as they were."""
    from adapterkit.adapters import activate, load_adapters
    from adapterkit.base import load_base
    from adapterkit.sections import BaseSection
    from adapterkit.evaluate import prompt_ids
    from adapterkit.scorer import RewardScorer
    model, tok = load_base(BaseSection(name=str(tiny_dir / "base")))
    model, names = load_adapters(model, [sft_adapter.path], ["policy"])
    activate(model, names, trainable=names)
    ids = torch.tensor([prompt_ids(tok, eval_pairs[0]["prompt"])], device=DEVICE)
    before = model(input_ids=ids).logits
    shared = RewardScorer.attach(model, tok, reward_adapter.path)
    rows = eval_pairs[:16]
    assert shared.score_pairs(rows) == scorer.score_pairs(rows)  # the same kernels on one device
    activate(model, names, trainable=names)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert all(p.requires_grad == (".policy." in n) for n, p in model.named_parameters() if ".lora_" in n)


def test_score_cli(reward_adapter, tiny_dir, capsys):
    from adapterkit.cli import main
    data = tiny_dir / "data" / "preferences_eval.jsonl"
    assert main(["score", "--reward", str(reward_adapter.path), str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "preference" and len(out["chosen"]) == 128
    # GPU: the scorer and the trained classifier round differently; a near-tie may flip (1/128 each)
    assert out["accuracy"] == pytest.approx(reward_adapter.metrics["eval_accuracy"], rel=tol(cpu=1e-6, cuda=0.05))


def test_bad_pair_is_refused_before_training(tiny_dir, tmp_path):
    from adapterkit.config import load_config
    from adapterkit.errors import DataError
    from adapterkit.stages.reward import train_reward
    rows = load_jsonl(tiny_dir / "data" / "preferences_eval.jsonl")[:3]
    rows[1]["rejected"] = [{"role": "user", "content": "oops"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "never"
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'rejected\[0\]\.role'"):
        train_reward(load_config("reward", "tiny_reward", [f"data.train={bad}", f"output.dir={out}"]))
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_long_pairs_keep_their_end(tiny_dir, tmp_path):
    """data.on_long=truncate cuts a long pair's prompt from the start: both sides keep their
    responses and EOS (the token the head reads) and stay different."""
    from adapterkit.config import load_config
    from adapterkit.stages.common import load_stage_tokenizer
    from adapterkit.stages.reward import setup_data
    rows = load_jsonl(tiny_dir / "data" / "preferences_eval.jsonl")[:4]
    for r in rows:
        r["prompt"] = [{"role": "system", "content": " ".join(["hot cold"] * 40)}] + r["prompt"]
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config("reward", "tiny_reward", [f"data.train={long}", "data.eval=null",
                                                   "data.on_long=truncate", "data.max_length=32"])
    tokenizer = load_stage_tokenizer(config)
    train, _, report = setup_data(config, tokenizer)
    assert report["truncated"] == 4
    for pair in train:
        assert len(pair["chosen_ids"]) == len(pair["rejected_ids"]) == 32
        assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id
        assert pair["chosen_ids"] != pair["rejected_ids"]
