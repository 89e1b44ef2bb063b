"""PPO's model: ONE quantized base with every role's adapters (``SharedBase``), built from a
config: parents, policy, reward (adapter or function) and value adapter + head."""
from __future__ import annotations

import torch

from adapterkit import rewards
from adapterkit.adapters import REWARD_STAGES, activate, load_parent_stack, lora_config, parent_record
from adapterkit.base import load_model
from adapterkit.config import PPOConfig
from adapterkit.stages.common import base_manifest
from adapterkit.tokens import model_device

POLICY, VALUE, REWARD = "policy", "value", "reward"


def positions(mask):
    """Position ids that skip left padding, as ``generate`` computes them. (B, L) -> (B, L)"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class SharedBase(torch.nn.Module):
    """The one PeftModel with every role's adapter, the reward and the value head.

    ``forward(role, ...)`` is the trainable pass (policy logits or values); the frozen roles run
    through ``score`` and ``response_logits`` under no_grad. Only policy and value weights ever
    require grad: peft's ``set_adapter`` toggles requires_grad, so ``use`` (``adapters.activate``)
    puts it back."""

    def __init__(self, peft_model, parents: list[str], scorer, value_head, temperature=1.0):
        super().__init__()
        self.peft, self.value_head, self.temperature = peft_model, value_head, temperature
        # scorer.RewardScorer (the frozen "reward" adapter and its head) or rewards.FunctionScorer
        self.scorer = scorer
        self.stacks = {"reference": parents, "policy": [*parents, POLICY], "value": [VALUE]}  # role -> adapters
        self.use("policy")

    def use(self, role: str) -> None:
        """Switch on ``role``'s adapters ([] = the bare base); policy and value stay trainable."""
        activate(self.peft, self.stacks[role], (POLICY, VALUE))

    def response_logits(self, ids, mask, n_resp: int):
        """Logits that predict the last n_resp tokens. (B, L) -> (B, R, V)"""
        out = self.peft(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                        logits_to_keep=n_resp + 1, use_cache=False)
        return out.logits[:, :-1].float() / self.temperature

    def response_values(self, ids, mask, n_resp: int):
        """V(s_t) for the state before each response token, from the backbone's last hidden
        states (no LM head). (B, L) -> (B, R)"""
        lm = self.peft.get_base_model()
        hidden = getattr(lm, lm.base_model_prefix)(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False
        ).last_hidden_state[:, -n_resp - 1:-1]                         # (B, R, H)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, role: str, ids, mask, n_resp: int):
        self.use(role)
        if role == "policy":
            return self.response_logits(ids, mask, n_resp)
        return self.response_values(ids, mask, n_resp)


# -- setup -------------------------------------------------------------------------------------

def build_model(config: PPOConfig, device, tokenizer) -> tuple[SharedBase, dict]:
    """ONE base; parents, policy, reward and value adapters on it. Returns the model and the
    manifest (with the parent stack and the reward adapter recorded)."""
    from peft import get_peft_model
    from adapterkit.scorer import RewardScorer
    p = config.ppo
    model = load_model(config.base, device)  # 4-bit kernels kept differentiable (quant.py)
    manifest = base_manifest(config, model, tokenizer)
    base_fp = manifest["base"]["fingerprint"]
    model, parents, manifest["parent"] = load_parent_stack(model, p.parent, base_fp)
    if parents:
        model.add_adapter(POLICY, lora_config(config))
    else:
        model = get_peft_model(model, lora_config(config), adapter_name=POLICY)
    if rewards.is_function_ref(p.reward):
        scorer = rewards.FunctionScorer.load(p.reward)
        manifest["reward_function"] = rewards.describe(p.reward)
    else:
        manifest["reward_model"] = parent_record(p.reward, base_fp, REWARD_STAGES, "reward model")
        scorer = RewardScorer.attach(model, tokenizer, manifest["reward_model"]["path"], name=REWARD)
    if p.value_init in (None, "reward") and isinstance(scorer, RewardScorer):
        # a second copy of the reward's LoRA and head, trainable
        head = RewardScorer.attach(model, tokenizer, manifest["reward_model"]["path"], name=VALUE).head.float()
    else:
        model.add_adapter(VALUE, lora_config(config))
        head = torch.zeros(1, model.config.hidden_size, device=model_device(model))
    value_head = torch.nn.Linear(head.size(1), 1, bias=False, device=head.device)
    value_head.weight.data.copy_(head)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return SharedBase(model, parents, scorer, value_head, p.temperature), manifest
