"""
Loss functions for RLHF-style adapter training: PPO, DPO (+ IPO / robust), reward models.

Pure tensor functions, torch only. Shapes: B = batch, T = response tokens, V = vocab.
`mask` is always 1.0 for valid response tokens and 0.0 for padding, same shape as the values.
References:
  PPO    Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (eq. 7, 9)
  GAE    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE" (eq. 16)
  KL     Ouyang et al. 2022, InstructGPT (eq. 2); Schulman 2020, "Approximating KL divergence"
  AdaKL  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (sec 2.2)
  DPO    Rafailov et al. 2023 (eq. 7); IPO Azar et al. 2023 (eq. 17)
  rDPO   Chowdhury et al. 2024, "Provably Robust DPO" (eq. 8); cDPO label smoothing
  RM     Bradley & Terry 1952; Ouyang et al. 2022 (eq. 1)

Which ones run in training: the PPO stage trains with the PPO/GAE/KL functions here. DPO and
the reward model train through trl's DPOTrainer and RewardTrainer, whose loss code we keep
(rewriting it would change every trained adapter for no gain); ``dpo_loss`` and
``bradley_terry_loss`` are the specification those trainers are held to: tests/test_objectives.py
checks trl's loss against them on a real batch of a partly trained run.
"""
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# masked statistics

def masked_mean(values, mask, dim=None):
    """Mean of values over positions where mask == 1. values, mask: (B, T) -> scalar, or reduced over dim."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1e-8)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)

def masked_var(values, mask, unbiased=True):
    """Variance of values over valid tokens. values, mask: (B, T) -> scalar."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 valid tokens, got {n.item()}")
        var = var * n / (n - 1)  # Bessel's correction
    return var

def masked_whiten(values, mask, shift_mean=True, eps=1e-8, all_sum=None):
    """Normalise values to mean 0, variance 1 over valid tokens; padded positions are set to 0.
    values, mask: (B, T) -> (B, T). With shift_mean=False the original mean is added back.
    ``all_sum`` (a tensor's sum over processes): the mean and the unbiased variance of every
    process's valid tokens together, the global batch of a distributed run."""
    if all_sum is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        n = all_sum(mask.sum())
        mean = all_sum((values * mask).sum()) / n
        var = all_sum(((values - mean) ** 2 * mask).sum()) / (n - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask

class RunningMoments:
    """Running mean and variance of every value seen so far, updated one batch at a time
    (Chan et al.'s parallel merge), to normalise reward scores: ``normalise(x) = (x - mean) /
    std``. The state is three floats (``state_dict``), so a resumed run continues it."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: int = 0):
        self.mean, self.var, self.count = float(mean), float(var), int(count)

    def update(self, values) -> None:
        """Merge a batch. values: any shape (flattened)."""
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        mean, var = values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalise(self, values, eps=1e-8):
        """(values - mean) / std, as values' dtype and device."""
        return (values - self.mean) / (self.var + eps) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

# -----------------------------------------------------------------------------
# KL estimators (Schulman 2020). Samples x ~ p (policy), q = reference.

def kl_k1(logprobs, ref_logprobs):
    """k1 = log p(x) - log q(x): unbiased, high variance, can be negative. (B, T) -> (B, T)"""
    return logprobs - ref_logprobs

def kl_k3(logprobs, ref_logprobs):
    """k3 = (r - 1) - log r with r = q(x)/p(x): unbiased, always >= 0. (B, T) -> (B, T)"""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}

def per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """InstructGPT eq. 2 as a per-token reward: r_t = -kl_coef * KL_t, plus the reward-model
    score r_phi(x, y) on the last valid token of each row.
    scores: (B,); logprobs, ref_logprobs, mask: (B, T) -> (rewards (B, T), kl (B, T))."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose from {sorted(KL_ESTIMATORS)}")
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs) * mask  # (B, T)
    rewards = -kl_coef * kl                                         # (B, T)
    last = mask.long().cumsum(dim=-1).argmax(dim=-1)                # (B,) index of last valid token
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += scores.to(rewards.dtype) * mask[rows, last]  # no score on an all-pad row
    return rewards, kl

# -----------------------------------------------------------------------------
# PPO

@torch.no_grad()
def gae_advantages(rewards, values, mask, gamma, lam):
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16):
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = sum_l (gamma * lam)^l * delta_{t+l}     (computed backwards: A_t = delta_t + gamma*lam*A_{t+1})
    Right-padded rows; V after the last valid token is 0 (episode ends).
    rewards, values, mask: (B, T) -> (advantages (B, T), returns (B, T)), 0 where mask == 0."""
    rewards, values = rewards * mask, values * mask
    T = rewards.size(-1)
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])                                   # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)  # 0 on padding
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask  # lambda-returns, targets for the value head
    return advantages, returns

def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), negated to a loss:
        L = -E_t[ min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t) ],  r_t = pi(a_t|s_t) / pi_old(a_t|s_t)
    logprobs, old_logprobs, advantages, mask: (B, T) -> (loss, clip_fraction, approx_kl) scalars.
    clip_fraction: share of valid tokens where the clipped term is binding (gradient is zero).
    approx_kl: k3 estimate of KL(pi_old || pi) on the rollout tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)                                                # (B, T)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        approx_kl = masked_mean(kl_k3(old_logprobs, logprobs), mask)
    return loss, clip_fraction, approx_kl

def ppo_value_loss(values, old_values, returns, mask, clip_range_value):
    """Clipped value loss (the L^VF term of Schulman et al. 2017, eq. 9, with value clipping as in
    OpenAI baselines): 0.5 * E_t[ max((V - R)^2, (V_clip - R)^2) ],
    V_clip = V_old + clip(V - V_old, -eps_v, eps_v).
    values, old_values, returns, mask: (B, T) -> (loss, value_clip_fraction) scalars."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return loss, clip_fraction

def entropy_from_logits(logits):
    """H = logsumexp(z) - sum_v softmax(z)_v z_v, numerically stable. (B, T, V) -> (B, T)"""
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)

# -----------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, sec. 2.2)

class AdaptiveKLController:
    """beta_{t+1} = beta_t * (1 + K_beta * e_t * n_steps),
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2), K_beta = 1 / horizon."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl, n_steps):
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface."""

    def __init__(self, kl_coef):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps):
        return self.value

# -----------------------------------------------------------------------------
# DPO family. logits h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)), all (B,).

def _sigmoid_loss(logits, beta, label_smoothing):
    # DPO eq. 7: -log sigma(beta * h); cDPO: labels flipped with probability eps
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)

def _ipo_loss(logits, beta, label_smoothing):
    # IPO (Azar et al. 2023, eq. 17): (h - 1/(2 tau))^2, tau = beta
    return (logits - 1 / (2 * beta)) ** 2

def _robust_loss(logits, beta, label_smoothing):
    # rDPO (Chowdhury et al. 2024, eq. 8): unbiased under label-flip rate eps < 1/2
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    return ((-F.logsigmoid(beta * logits) * (1 - label_smoothing)
             + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing))

DPO_LOSSES = {"sigmoid": _sigmoid_loss, "ipo": _ipo_loss, "robust": _robust_loss}

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Direct Preference Optimisation loss (Rafailov et al. 2023, eq. 7) and variants.
    All inputs are summed sequence log-probs, (B,).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are the implicit
    beta * log(pi / ref), detached."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {sorted(DPO_LOSSES)}")
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios                                    # (B,)
    losses = DPO_LOSSES[loss_type](logits, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards

# -----------------------------------------------------------------------------
# reward model

def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """Pairwise reward-model loss (Bradley-Terry; Ouyang et al. 2022 eq. 1; margin as in Llama 2):
    -E[log sigma(r(x, y_w) - r(x, y_l) - m)]. Inputs (B,), margin (B,) or scalar -> scalar."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()
