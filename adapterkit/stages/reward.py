"""Reward model: a LoRA adapter plus a scalar head, Bradley-Terry loss, over trl's ``RewardTrainer``.

    adapterkit reward tiny_reward train.learning_rate=1e-3

setup (the 4-bit base as a 1-label sequence classifier, preference pairs, LoRA) -> train ->
held-out pairwise accuracy and margin -> save the artifact.

The artifact is a normal PEFT ``SEQ_CLS`` adapter: the head (``score``, a (1, H) weight) is
saved in ``adapter_model.safetensors`` beside the LoRA weights (peft's ``modules_to_save``),
so it never comes back randomly initialised. It serves two ways:

- vanilla ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`` +
  ``PeftModel.from_pretrained(model, dir)``;
- ``RewardScorer``: the LoRA as a named adapter on a causal-LM base shared with the policy
  (what PPO needs), the head applied to the last hidden state of the last non-pad token.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adapterkit.base import (REWARD_STAGES, check_base_on_disk, checked_adapter, fingerprint, load_model,
                             load_tokenizer, parent_entry, trained_base, use_adapters)
from adapterkit.config import RewardConfig
from adapterkit.data import load_data
from adapterkit.errors import DataError
from adapterkit.preflight import preflight
from adapterkit.plots import history_series, plot_curves
from adapterkit.stages.common import (AdapterRecord, base_manifest, keep_adapters_fp32, load_stage_tokenizer,
                                      quiet_trainer, run_dir, save_stage_artifact, trainer_kwargs)
from adapterkit.tokens import model_device, right_pad, to_device

HEAD = "score"  # transformers' name for the sequence-classification head
SCORES_FILE = "eval_scores.json"


# -- tokenization: one rule for training and scoring -----------------------------------------

def conversation_ids(tokenizer, prompt, response) -> list[int]:
    """Prompt + response as trl's RewardTrainer tokenizes them (chat template, or text + EOS)."""
    if isinstance(prompt, list) or isinstance(response, list):
        turns = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        out = tokenizer.apply_chat_template((prompt or []) + turns, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    text = (prompt or "") + response
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text=text)["input_ids"]


def last_token_index(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) -> (B,): the rightmost non-pad token, the rule of transformers' classifiers."""
    positions = torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32)
    return (positions * (ids != pad_id).to(torch.int32)).argmax(-1)


@torch.no_grad()
def batch_scores(score_ids, seqs: list[list[int]], pad_id: int, batch_size: int, device) -> list[float]:
    """Score token sequences in order, ``batch_size`` at a time; ``score_ids(ids, mask) -> (B,)``
    takes batches made on ``device`` (the scoring model's)."""
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = right_pad(seqs[i:i + batch_size], pad_id, device)
        out += score_ids(ids, mask).float().cpu().tolist()
    return out


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Pairwise accuracy (chosen scored higher) and the mean margin r(chosen) - r(rejected)."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins)}


# -- the scorer on a shared causal-LM base -----------------------------------------------------

def split_adapter_weights(adapter_dir: str | Path) -> tuple[dict, torch.Tensor]:
    """adapter_model.safetensors -> (LoRA tensors, head weight (1, H))."""
    from safetensors.torch import load_file
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    heads = [k for k in tensors if k.endswith(f".{HEAD}.weight")]
    if len(heads) != 1:
        raise DataError(f"{adapter_dir}/adapter_model.safetensors: expected one '{HEAD}' head "
                        f"weight, found {len(heads)}; not a reward adapter")
    head = tensors.pop(heads[0])
    return tensors, head


@dataclass
class RewardScorer:
    """A reward adapter living as a named LoRA on a causal-LM PeftModel (shared with a policy).

    score = head · h_T, h_T the last hidden state (B, H) at the last non-pad token."""
    model: object  # peft.PeftModel over a causal LM
    tokenizer: object
    head: torch.Tensor  # (1, H)
    adapter: str
    batch_size: int = 32

    @classmethod
    def attach(cls, model, tokenizer, adapter_dir: str | Path, name: str = "reward") -> "RewardScorer":
        """Load the reward LoRA (without its head module) onto ``model``; the head becomes a tensor."""
        from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
        lora, head = split_adapter_weights(adapter_dir)
        cfg = LoraConfig.from_pretrained(str(adapter_dir))
        cfg.modules_to_save, cfg.task_type, cfg.lora_dropout, cfg.inference_mode = None, "CAUSAL_LM", 0.0, True
        if isinstance(model, PeftModel):
            model.add_adapter(name, cfg)
        else:
            model = get_peft_model(model, cfg, adapter_name=name)
        result = set_peft_model_state_dict(model, lora, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise DataError(f"{adapter_dir}: LoRA weights do not fit this base "
                            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        for n, p in model.named_parameters():
            if f".{name}." in n:
                p.requires_grad = False
        return cls(model, tokenizer, head.to(model_device(model)), name)

    @classmethod
    def load(cls, adapter: str | Path, device: str | None = None, registry: str | None = None) -> "RewardScorer":
        """The base the adapter's manifest names (as it was quantized; never with remote code),
        with the adapter on it. ``adapter``: a directory or a registry reference. The adapter is
        verified and the base's weights checked against its fingerprint before the base loads."""
        adapter_dir, manifest = checked_adapter(adapter, REWARD_STAGES, "reward model", registry)
        section = trained_base(manifest)
        check_base_on_disk(section, manifest["base"].get("fingerprint"), str(adapter))
        model, tokenizer = load_model(section, device), load_tokenizer(section)
        parent_entry(adapter_dir, fingerprint(model, tokenizer), REWARD_STAGES, "reward model")
        return cls.attach(model, tokenizer, adapter_dir)

    @torch.no_grad()
    def score_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, mask -> (B,) rewards, with only the reward adapter switched on."""
        ids, mask = to_device((ids, mask), self.model)  # no copy when already there (PPO's rollouts)
        device = ids.device
        backbone = self.model.get_base_model().base_model  # the decoder, without the LM head
        with use_adapters(self.model, [self.adapter]):
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        logits = F.linear(hidden, self.head.to(hidden.dtype))  # (B, T, 1), as the classifier does
        return logits[torch.arange(ids.shape[0], device=device), last_token_index(ids, self.tokenizer.pad_token_id), 0]

    def score(self, prompts: list, responses: list) -> list[float]:
        """One reward per (prompt, response); prompts are messages or text, or None."""
        seqs = [conversation_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        return batch_scores(self.score_ids, seqs, self.tokenizer.pad_token_id, self.batch_size,
                            model_device(self.model))

    def score_pairs(self, rows: list[dict]) -> tuple[list[float], list[float]]:
        """Preference rows -> (rewards of chosen, rewards of rejected)."""
        prompts = [r.get("prompt") for r in rows]
        return (self.score(prompts, [r["chosen"] for r in rows]),
                self.score(prompts, [r["rejected"] for r in rows]))


def score_rows(scorer: RewardScorer, rows: list[dict], fmt: str) -> dict:
    """Rewards for validated rows: pairs (with accuracy and margin) or single responses."""
    if fmt == "preference":
        chosen, rejected = scorer.score_pairs(rows)
        return {"format": fmt, "chosen": chosen, "rejected": rejected, **pair_metrics(chosen, rejected)}
    if fmt == "messages":
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    scores = scorer.score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    return {"format": fmt, "scores": scores, "mean": sum(scores) / len(scores)}


def score_file(reward: str | Path, data: str, registry: str | None = None) -> dict:
    """``adapterkit score``: rewards for a file of pairs, prompt/completion rows or chats."""
    checked_adapter(reward, REWARD_STAGES, "reward model", registry)  # before the data is read
    loaded = load_data(data, fmt="auto", allowed=("preference", "prompt_completion", "messages"))
    scorer = RewardScorer.load(reward, registry=registry)
    return score_rows(scorer, loaded.rows, loaded.format)


# -- training ------------------------------------------------------------------------------------

def keep_end(ids: list[int], max_length: int) -> list[int]:
    """A sequence cut to its last ``max_length`` tokens. The head reads the last token, and a
    pair's two sides differ at the end (same prompt, different responses): cutting the end
    off instead leaves the head reading a mid-prompt token, and a pair whose prompt fills
    ``max_length`` becomes two identical sequences (no signal; a tie, scored as wrong)."""
    return list(ids)[-max_length:]


def setup_data(config: RewardConfig, tokenizer):
    """Pairs tokenized here (so scoring uses the very same ids); a pair longer than
    ``data.max_length`` (``data.on_long=truncate``) loses the start of its prompt (``keep_end``)."""
    from datasets import Dataset
    d = config.data
    kw = dict(fmt=d.format, allowed=("preference",), tokenizer=tokenizer, max_length=d.max_length,
              on_long=d.on_long, hub_split=d.hub_split)
    train = load_data(d.train, **kw)
    evals = load_data(d.eval, **kw) if d.eval else None

    def tokenized(rows):
        return [{key: keep_end(conversation_ids(tokenizer, r.get("prompt"), r[key.removesuffix("_ids")]), d.max_length)
                 for key in ("chosen_ids", "rejected_ids")} for r in rows]
    report = {"train_rows": len(train.rows), **train.report}
    return Dataset.from_list(tokenized(train.rows)), (tokenized(evals.rows) if evals else None), report


def build_model(config: RewardConfig):
    """The base as a 1-label classifier with a LoRA adapter; the head trains in full."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning
    from adapterkit.stages.sft import lora_config
    set_seed(config.train.seed)  # the head starts random: make it the same random every run
    with suppress_seqcls_warning():
        model = load_model(config.base, num_labels=1)
    if config.base.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    return get_peft_model(model, lora_config(config, task_type="SEQ_CLS"))  # head: modules_to_save


def train_reward(config: RewardConfig) -> AdapterRecord:
    """Train a reward adapter as the config says; returns the saved adapter's record."""
    preflight(config)  # output folder, adapters and data rows, before any model loads
    from trl import RewardConfig as TrlRewardConfig, RewardTrainer

    tokenizer = load_stage_tokenizer(config)
    train_ds, eval_pairs, report = setup_data(config, tokenizer)
    model = build_model(config)
    manifest = base_manifest(config, model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id  # where the classifier reads its score

    scratch = run_dir()
    args = TrlRewardConfig(**trainer_kwargs(config, scratch), max_length=None,
                           center_rewards_coefficient=config.reward.center_rewards_coefficient)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    quiet_trainer(trainer, config)
    keep_adapters_fp32(trainer.model)  # trl made them bf16
    result = trainer.train()
    history = trainer.state.log_history
    shutil.rmtree(scratch, ignore_errors=True)

    metrics = {"train_loss": result.training_loss, "steps": result.global_step, **report}
    scores = {}
    if eval_pairs:
        scores = evaluate_pairs(trainer.model, tokenizer, eval_pairs, config.reward.eval_batch_size)
        metrics |= {"eval_accuracy": scores["accuracy"], "eval_margin": scores["margin"]}

    def extra(tmp: Path) -> None:
        if scores:
            (tmp / SCORES_FILE).write_text(json.dumps(scores))
        plot_curves(tmp / "reward.png", history_series(history, ["loss", "accuracy", "margin"]),
                    "reward model (train)")

    return save_stage_artifact(
        config, {**manifest, "metrics": metrics, "reward": {"head": HEAD, "pad_token": tokenizer.pad_token}},
        lambda tmp: trainer.model.save_pretrained(tmp, safe_serialization=True), extra)


def evaluate_pairs(model, tokenizer, pairs: list[dict], batch_size: int) -> dict:
    """Held-out rewards of the trained classifier: chosen, rejected, accuracy, margin."""
    was_training = model.training
    model.eval()
    score_ids = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits[:, 0]  # noqa: E731
    device = model_device(model)
    chosen, rejected = (batch_scores(score_ids, [p[k] for p in pairs], tokenizer.pad_token_id, batch_size, device)
                        for k in ("chosen_ids", "rejected_ids"))
    model.train(was_training)
    return {"chosen": chosen, "rejected": rejected, **pair_metrics(chosen, rejected)}
