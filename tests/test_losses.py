"""Unit tests for adapterkit.losses against values worked out by hand in the comments."""
import math

import pytest
import torch

from adapterkit.losses import (
    DPO_LOSSES, AdaptiveKLController, FixedKLController, RunningMoments, bradley_terry_loss, dpo_loss,
    entropy_from_logits, gae_advantages, kl_k1, kl_k3, masked_mean, masked_var, masked_whiten,
    per_token_rewards, ppo_policy_loss, ppo_value_loss,
)

LN2 = math.log(2.0)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- masked stats

# valid values 1, 2, 3, 4, 5, 6 (mean 3.5); 100 and -50 are padding
VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, -50.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])


def test_masked_mean_ignores_padding():
    close(masked_mean(VALUES, MASK), 3.5)                 # 21 / 6
    close(masked_mean(VALUES, MASK, dim=1), [2.5, 5.5])   # 10/4, 11/2


def test_masked_var_by_hand():
    # squared deviations: 6.25 2.25 0.25 0.25 2.25 6.25 -> sum 17.5
    close(masked_var(VALUES, MASK, unbiased=True), 17.5 / 5)    # 3.5
    close(masked_var(VALUES, MASK, unbiased=False), 17.5 / 6)   # 2.916667


def test_masked_whiten_mean0_var1_on_valid_tokens_only():
    w = masked_whiten(VALUES, MASK)
    close(masked_mean(w, MASK), 0.0, atol=1e-6)
    close(masked_var(w, MASK), 1.0, atol=1e-5)
    # x = 1 -> (1 - 3.5) / sqrt(3.5) = -1.336306
    close(w[0, 0], -1.336306, atol=1e-5)
    close(w[1, 2:], [0.0, 0.0])                          # padding zeroed
    other_padding = VALUES.clone()
    other_padding[1, 2:] = torch.tensor([-7.0, 1e4])     # padded values must not matter
    close(masked_whiten(other_padding, MASK), w)


def test_masked_whiten_keep_mean():
    w = masked_whiten(VALUES, MASK, shift_mean=False)
    close(masked_mean(w, MASK), 3.5, atol=1e-5)
    close(w[0, 0], 3.5 - 1.336306, atol=1e-5)            # 2.163694


# ----------------------------------------------------------------------------- KL

def test_kl_estimators_known_values():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    # k1 = log p - log q: ln 2, -ln 2, 0
    close(kl_k1(logp, ref), [LN2, -LN2, 0.0])
    # k3 with r = q/p: r=0.5 -> -0.5 + ln 2 = 0.193147; r=2 -> 1 - ln 2 = 0.306853; r=1 -> 0
    close(kl_k3(logp, ref), [-0.5 + LN2, 1.0 - LN2, 0.0])


def test_per_token_rewards_score_on_last_valid_token():
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -0.5, -2.0]])
    diff = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.1, 5.0]])   # logp - ref; 5.0 is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([1.0, 2.0])
    rewards, kl = per_token_rewards(scores, ref + diff, ref, mask, kl_coef=0.5)
    close(kl, [[0.1, 0.2, 0.3], [0.4, -0.1, 0.0]])
    # -0.5 * kl, plus score at index 2 (row 0) and index 1 (row 1)
    close(rewards, [[-0.05, -0.10, -0.15 + 1.0], [-0.20, 0.05 + 2.0, 0.0]])


def test_per_token_rewards_k3_estimator():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    rewards, kl = per_token_rewards(torch.tensor([0.0]), logp, ref, torch.ones(1, 2),
                                    kl_coef=1.0, estimator="k3")
    close(kl, [[-0.5 + LN2, 1.0 - LN2]])
    close(rewards, [[0.5 - LN2, LN2 - 1.0]])
    with pytest.raises(ValueError):
        per_token_rewards(torch.tensor([0.0]), logp, ref, torch.ones(1, 2), 1.0, estimator="k9")


# ----------------------------------------------------------------------------- GAE

def test_gae_gamma1_lam1_is_return_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: delta2 = 3 + 0 - 1.5 = 1.5; delta1 = 2 + 1.5 - 1 = 2.5; delta0 = 1 + 1 - 0.5 = 1.5
    #        A = [1.5 + 2.5 + 1.5, 2.5 + 1.5, 1.5] = [5.5, 4, 1.5]; R = A + V = [6, 5, 3]
    # row 1 (len 2, V after last valid = 0): delta1 = 2 + 0 - 1 = 1; delta0 = 1 + 1 - 0.5 = 1.5
    #        A = [2.5, 1, 0]; R = [3, 2, 0]
    close(adv, [[5.5, 4.0, 1.5], [2.5, 1.0, 0.0]])
    close(ret, [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]])


def test_gae_gamma_lambda_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.95)
    # gamma * lam = 0.855
    # delta2 = 1 + 0.9*0 - 0.7 = 0.3
    # delta1 = 0 + 0.9*0.7 - 0.6 = 0.03
    # delta0 = 0 + 0.9*0.6 - 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.855*0.3 = 0.2865; A0 = 0.04 + 0.855*0.2865 = 0.2849575
    close(adv, [[0.2849575, 0.2865, 0.3]])
    close(ret, [[0.7849575, 0.8865, 1.0]])


# ----------------------------------------------------------------------------- PPO

def test_ppo_policy_loss_clipping_by_hand():
    # ratios 1.1 (inside), 1.5 (above, A>0: clipped to 1.2), 0.5 (below, A>0: unclipped term is
    # smaller so it is used), 0.5 (below, A<0: clipped to 0.8); 5th token is padding
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 9.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old = torch.full((1, 5), -2.0)
    logp = (old + torch.log(ratios)).requires_grad_()
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    # -A*r    = [-1.1, -1.5, -0.5, 0.5];  -A*clip(r) = [-1.1, -1.2, -0.8, 0.8]
    # max     = [-1.1, -1.2, -0.5, 0.8] -> mean -2.0 / 4 = -0.5
    close(loss, -0.5)
    close(clip_frac, 0.5)                              # tokens 1 and 3
    # k3 = (r - 1) - ln r: 0.0046898 + 0.0945349 + 2 * 0.1931472 = 0.4855191 -> / 4
    close(approx_kl, 0.4855191 / 4)
    loss.backward()
    # d loss / d logp_t = -A_t r_t / 4 where unclipped, 0 where the clip binds or padded
    close(logp.grad, [[-1.1 / 4, 0.0, -0.5 / 4, 0.0, 0.0]])


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, logp.clone(), adv, mask, 0.2)
    close(loss, -0.5)                                  # -(2 - 1) / 2
    close(clip_frac, 0.0)
    close(approx_kl, 0.0)


def test_ppo_value_loss_clipping_by_hand():
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.1, 1.5, 0.5, 1.5, 50.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0, 1.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clip_frac = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # V_clip = [1.1, 1.2, 0.8, 1.2]
    # (V-R)^2      = [0.81, 0.25, 0.25, 0.25]
    # (V_clip-R)^2 = [0.81, 0.64, 0.64, 0.04]
    # max = [0.81, 0.64, 0.64, 0.25] -> mean 2.34 / 4 = 0.585 -> * 0.5 = 0.2925
    close(loss, 0.2925)
    close(clip_frac, 0.5)                              # tokens 1 and 2


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],            # uniform over 4: ln 4
                            [0.0, math.log(3.0), -1e9, -1e9],  # p = [1/4, 3/4, 0, 0]
                            [1000.0, 0.0, 0.0, 0.0]]])         # one-hot, large logits: 0
    # H(1/4, 3/4) = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    h = entropy_from_logits(logits)
    assert h.shape == (1, 3)
    close(h, [[math.log(4.0), 0.5623351, 0.0]], atol=1e-5)


# ----------------------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_moves_towards_target_and_clips():
    up = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5 -> clipped to 0.2; 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    close(up.update(9.0, n_steps=256), 0.201024)
    close(up.value, 0.201024)
    down = AdaptiveKLController(0.2, 6.0, 10000)
    # KL 3: error -0.5 -> -0.2; 0.2 * (1 - 0.0512/10) = 0.198976
    down.update(torch.tensor(3.0), 256)
    close(down.value, 0.198976)
    small = AdaptiveKLController(0.2, 6.0, 10000)
    # KL 6.6: error 0.1 (not clipped); 0.2 * (1 + 0.1 * 256 / 10000) = 0.200512
    small.update(6.6, 256)
    close(small.value, 0.200512)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    ctl.update(0.0, 256)
    assert ctl.value == 0.05


# ----------------------------------------------------------------------------- DPO

def _dpo(beta, loss_type, eps=0.0, equal=False):
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = (pc.clone(), pr.clone()) if equal else (torch.tensor([-2.0]), torch.tensor([-2.0]))
    return dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=eps)


def test_dpo_sigmoid_at_reference_is_ln2_with_zero_rewards():
    for eps in (0.0, 0.1):
        losses, cr, rr = _dpo(0.1, "sigmoid", eps, equal=True)
        close(losses, [LN2])
        close(cr, [0.0])
        close(rr, [0.0])


def test_dpo_sigmoid_and_cdpo_by_hand():
    # h = (-1 - -3) - (-2 - -2) = 2; beta h = 1
    losses, cr, rr = _dpo(0.5, "sigmoid")
    close(losses, [math.log1p(math.exp(-1.0))])       # -log sigma(1) = 0.3132617
    close(cr, [0.5])                                   # 0.5 * (-1 - -2)
    close(rr, [-0.5])                                  # 0.5 * (-3 - -2)
    # cDPO eps=0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
    close(_dpo(0.5, "sigmoid", eps=0.1)[0], [0.4132617])


def test_dpo_ipo_by_hand():
    # (h - 1/(2 beta))^2 with beta 0.1: h = 2 -> (2 - 5)^2 = 9; at reference h = 0 -> 25
    close(_dpo(0.1, "ipo")[0], [9.0])
    close(_dpo(0.1, "ipo", equal=True)[0], [25.0])


def test_dpo_robust():
    # eps = 0 reduces to plain DPO
    close(_dpo(0.5, "robust", 0.0)[0], _dpo(0.5, "sigmoid", 0.0)[0])
    # eps = 0.1, beta h = 1: (0.9 * 0.3132617 + 0.1 * (-1.3132617)) / 0.8 = 0.1882617
    close(_dpo(0.5, "robust", 0.1)[0], [0.1882617])
    with pytest.raises(ValueError):
        _dpo(0.5, "robust", 0.5)


def test_dpo_loss_registry_and_unknown_type():
    assert {"sigmoid", "ipo", "robust"} <= set(DPO_LOSSES)
    with pytest.raises(ValueError):
        _dpo(0.1, "hinge-typo")


def test_dpo_gradient_pushes_chosen_up():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    losses.sum().backward()
    # d/dh -log sigma(beta h) at h = 0 = -beta * 0.5 = -0.05
    close(pc.grad, [-0.05])
    close(pr.grad, [0.05])


# ----------------------------------------------------------------------------- reward model

def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # [-log sigma(1), -log sigma(0)] = [0.3132617, 0.6931472] -> mean 0.5032044
    close(bradley_terry_loss(chosen, rejected), 0.5032044)
    # margin [1, 0]: both differences become 0 -> ln 2
    close(bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0])), LN2)


# ----------------------------------------------------------------------------- score normalisation

def test_running_moments_merge_batches_as_one_and_normalise():
    values = torch.tensor([0.0, 1.0, 1.0, 0.5, 8.0, -8.0, 2.0])
    moments = RunningMoments()
    moments.update(values[:3])
    moments.update(values[3:].reshape(2, 2))  # any shape, flattened
    moments.update(torch.tensor([]))          # an empty batch changes nothing
    # mean 4.5/7; population variance of all seven values
    mean = 4.5 / 7
    var = float(((values - mean) ** 2).mean())
    assert moments.count == 7
    close(torch.tensor(moments.mean), mean, atol=1e-12)
    close(torch.tensor(moments.var), var, atol=1e-12)
    close(moments.normalise(values), (values - mean) / var ** 0.5, atol=1e-6)
    again = RunningMoments(**moments.state_dict())  # a resumed run continues the same moments
    assert again.state_dict() == moments.state_dict()
    # the normalised scores are the same whatever the reward's scale and offset
    scaled = RunningMoments()
    scaled.update(values[:3] * 16 - 8)
    scaled.update(values[3:] * 16 - 8)
    close(scaled.normalise(values * 16 - 8), moments.normalise(values), atol=1e-5)
