"""A trained reward adapter as a scorer: ``RewardScorer`` puts its LoRA on a causal-LM base
shared with a policy (what PPO and DPO's win rate need) and applies its head (``score``, a
(1, H) weight) to the last hidden state of the last non-pad token, exactly as the
sequence classifier it was trained as. ``score_file`` is ``adapterkit score``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adapterkit.adapters import REWARD_STAGES, checked_adapter, parent_record, use_adapters
from adapterkit.base import check_base_on_disk, fingerprint, load_model, load_tokenizer, trained_base
from adapterkit.data import load_data
from adapterkit.errors import DataError
from adapterkit.tokens import conversation_ids, model_device, right_pad, to_device

HEAD = "score"  # transformers' name for the sequence-classification head


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
        section = trained_base(manifest, adapter_dir)
        check_base_on_disk(section, manifest["base"].get("fingerprint"), str(adapter))
        model, tokenizer = load_model(section, device), load_tokenizer(section)
        parent_record(adapter_dir, fingerprint(model, tokenizer), REWARD_STAGES, "reward model")
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
