"""Tests of crd.py, the algorithm: hand-computed values of each pure function, the invariances that make CRD
correct (a per-prompt reward shift changes nothing; theta = old gives a zero implicit reward; the loss vanishes when
beta R^ = R; permuting a group permutes the per-sample terms; at theta = old DiffusionNFT's gradient is sigma times
CRD's), an analytic tilt on a toy flow, what one update shares, the LoRA adapters, and main() end to end on the
embedded model with an exact resume, the objectives and the presets. CPU, offline, tiny shapes, explicit generators.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os

import pytest
import torch

import baselines
import crd
import diagnostics
import plumbing
from conftest import lora_moved, randn, sd35m_layout_pipeline, tiny_config


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: hand-computed values
# ---------------------------------------------------------------------------------------------------------------
def test_interpolate_hand_values():
    x0, eps = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    x = crd.interpolate(x0, eps, torch.tensor([0.0, 0.25]))
    assert x.flatten().tolist() == [2.0, 0.75 * 2.0 - 0.25]  # sigma = 0 is data, (1 - s) x0 + s eps


def test_implicit_reward_hand_values():
    u = torch.zeros(1, 1, 1, 2)
    v_theta, v_old = torch.tensor([[[[1.0, 3.0]]]]), torch.tensor([[[[2.0, 2.0]]]])
    # plain: -mean((1, 9) - (4, 4)) = -1
    assert crd.implicit_reward(v_theta, v_old, u, adaptive_norm=False).item() == pytest.approx(-1.0)
    # adaptive: w_theta = mean|1,3| = 2, w_old = 2 -> -mean((1, 9)/2 - (4, 4)/2) = -0.5
    assert crd.implicit_reward(v_theta, v_old, u, adaptive_norm=True).item() == pytest.approx(-0.5)


def test_implicit_reward_is_zero_when_theta_equals_old():
    v, u = randn(3, 4, 2, 2, seed=1), randn(3, 4, 2, 2, seed=2)
    for adaptive in (True, False):
        assert torch.equal(crd.implicit_reward(v, v.clone(), u, adaptive), torch.zeros(3))


def test_normalize_rewards_ignore_a_global_affine_change_and_ties_give_one_half():
    """Eq. (6): r -> a r + b (a > 0, the same for the whole batch) leaves r~ unchanged (up to the 1e-6 of the
    divisor); an all-tied batch, at any value, gives r~ = 0.5 exactly, no NaN."""
    rewards = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    base = crd.normalize_rewards(rewards)
    for a, b in ((2.0, 0.0), (0.5, 3.0), (10.0, -4.0)):
        assert torch.allclose(crd.normalize_rewards(a * rewards + b), base, atol=1e-5)
    for value in (0.0, 0.1, 0.7, 0.9, 1.0):
        assert torch.equal(crd.normalize_rewards(torch.full((3, 8), value)), torch.full((3, 8), 0.5))


def test_normalize_rewards_hand_values():
    rewards = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    # group means 0.5, 0.5; population std of (0, 1, .5, .5) = sqrt(0.125)
    a = 0.5 / (0.125 ** 0.5 + 1e-6)
    expected = torch.tensor([[0.5 - a / 10, 0.5 + a / 10], [0.5, 0.5]])
    assert torch.allclose(crd.normalize_rewards(rewards), expected, atol=1e-6)
    # advantages are clipped at +-5, then r~ at [0, 1]
    rare = torch.zeros(100, 4)
    rare[0, 3] = 1.0  # one success in 400: A = 0.75 / 0.05 = 15 -> clipped to 5 -> r~ = 1
    extreme = crd.normalize_rewards(rare)
    assert extreme[0, 3].item() == pytest.approx(1.0) and extreme[0, 0].item() == pytest.approx(0.5 - 0.25 / 0.05 / 10)


def test_group_center_hand_values():
    x = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert crd.group_center(x, 2).tolist() == [-1.0, 1.0, -5.0, 5.0]
    assert crd.group_center(x, 2, centering="batch").tolist() == [-7.5, -5.5, 1.5, 11.5]


def test_crd_loss_hand_value():
    r_hat, rewards = torch.tensor([0.1, 0.3]), torch.tensor([0.4, 0.6])
    # R^ = (-0.1, 0.1), R = (-0.1, 0.1), beta = 2: (5/2) mean((-0.2+0.1)^2, (0.2-0.1)^2) = 0.025
    assert crd.crd_loss(r_hat, rewards, 2, beta=2.0).item() == pytest.approx(0.025)


def test_cfg_anchor_kl_and_kl_weights_hand_values():
    v_theta, cond, uncond = torch.full((1, 1, 1, 2), 3.0), torch.full((1, 1, 1, 2), 1.0), torch.zeros(1, 1, 1, 2)
    assert crd.cfg_anchor_kl(v_theta, cond, uncond, 2.0).item() == pytest.approx(1.0)  # v_cfg = 2 -> (3-2)^2
    assert crd.cfg_anchor_kl(v_theta, cond, uncond, 1.0).item() == pytest.approx(4.0)  # no CFG: v_cfg = 1
    w = crd.kl_weights(torch.tensor([0.0, 0.5, 1.0]), kl_beta=0.1)
    assert torch.allclose(w, torch.tensor([1e-4, 1e-4 + 0.5 * (0.1 - 1e-4), 0.1]))
    assert crd.kl_weights(torch.tensor([0.0, 1.0]), 0.1, adaptive=False).tolist() == pytest.approx([0.1, 0.1])
    # kl_beta = 0 is no anchor at all: the floor leaves no weight on low-reward samples
    assert crd.kl_weights(torch.tensor([0.0, 0.3, 1.0]), 0.0).tolist() == [0.0, 0.0, 0.0]


def test_nft_baseline_loss_hand_values():
    # one sample, x0 = (0, 0), sigma = 0.5, x_sigma = (1, 1); v_old = (2, 0), v_theta = (2, 2)
    x0, x_sigma, sigma = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.tensor([0.5])
    v_old, v_theta = torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[2.0, 2.0]]]])
    # beta 1: v+ = v_theta -> x0+ = (0, 0), L+ = 0; v- = 2 v_old - v_theta = (2, -2) -> x0- = (0, 2), w- = 1, L- = 2
    loss = baselines.nft_loss(v_theta, v_old, x_sigma, x0, sigma, torch.tensor([0.25]), beta=1.0)
    assert loss.item() == pytest.approx(5 * (0.25 * 0 + 0.75 * 2))
    # beta 0.5: v+ = (2, 1) -> err (0, .5), w .25, L+ = .5; v- = (2, -1) -> err (0, 1.5), w .75, L- = 1.5
    loss = baselines.nft_loss(v_theta, v_old, x_sigma, x0, sigma, torch.tensor([0.25]), beta=0.5)
    assert loss.item() == pytest.approx(5 * (0.25 * 0.5 / 0.5 + 0.75 * 1.5 / 0.5))
    # at v_theta = v_old a high reward pulls x0+ toward x0, a low one pushes it away
    for r, closer in ((1.0, True), (0.0, False)):
        v = v_old.clone().requires_grad_(True)
        baselines.nft_loss(v, v_old, x_sigma, x0, sigma, torch.tensor([r])).backward()
        stepped = x_sigma - sigma * (v.detach() - 0.01 * v.grad)
        assert ((stepped - x0).abs().sum() < (x_sigma - sigma * v_old - x0).abs().sum()) == closer


def test_ema_schedules_of_eq8():
    eta_old = lambda s: crd.ema_decay(s, *crd.decay_schedule(crd.OCR_OLD_DECAY))  # noqa: E731
    eta_samp = lambda s: crd.ema_decay(s, *crd.decay_schedule(crd.OCR_SAMPLER_DECAY))  # noqa: E731
    assert [eta_old(s) for s in (0, 100, 149, 1000)] == pytest.approx([0.25, 0.75, 0.995, 0.999])
    assert [eta_samp(s) for s in (0, 74, 75, 175, 1000)] == pytest.approx([0.0, 0.0, 0.0, 0.75, 0.999])


def test_ema_update_hand_values_and_hard_copy():
    target, source = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    crd.ema_update(target, source, 0.75)
    assert target[0].tolist() == [1.5, 3.0]  # 0.75 * t + 0.25 * s
    crd.ema_update(target, source, 0.0)
    assert target[0].tolist() == [3.0, 6.0]


# ---------------------------------------------------------------------------------------------------------------
# Invariances of the CRD loss
# ---------------------------------------------------------------------------------------------------------------
def loss_and_grad(rewards, r_hat, **kwargs):
    r_hat = r_hat.clone().requires_grad_(True)
    loss = crd.crd_loss(r_hat, rewards, group_size=3, beta=0.7, **kwargs)
    loss.backward()
    return loss.detach(), r_hat.grad


def test_per_prompt_reward_shift_leaves_loss_and_gradient_unchanged():
    rewards, r_hat = torch.rand(6, generator=torch.Generator().manual_seed(0)), randn(6, seed=3)
    shift = torch.tensor([0.3, 0.3, 0.3, -0.2, -0.2, -0.2])  # one constant per prompt group = the log Z(c) term
    loss, grad = loss_and_grad(rewards, r_hat)
    for shifted_rewards, shifted_r_hat in ((rewards + shift, r_hat), (rewards, r_hat + shift)):
        loss_shifted, grad_shifted = loss_and_grad(shifted_rewards, shifted_r_hat)
        assert torch.allclose(loss, loss_shifted, atol=1e-6) and torch.allclose(grad, grad_shifted, atol=1e-6)
    # batch centring only removes a shift shared by the whole batch, not a per-prompt one
    loss_batch, _ = loss_and_grad(rewards, r_hat, centering="batch")
    assert not torch.allclose(loss_batch, loss_and_grad(rewards + shift, r_hat, centering="batch")[0])


def test_loss_is_zero_when_beta_r_hat_equals_centred_reward():
    rewards = torch.tensor([0.2, 0.5, 0.8, 0.1, 0.1, 0.4])
    centred = crd.group_center(rewards, 3)
    r_hat = centred / 0.7 + torch.tensor([5.0, 5.0, 5.0, -1.0, -1.0, -1.0])  # any per-group offset
    loss, grad = loss_and_grad(rewards, r_hat)
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and grad.abs().max().item() < 1e-6


def test_permuting_a_group_permutes_the_per_sample_terms():
    rewards, r_hat = torch.rand(6, generator=torch.Generator().manual_seed(1)), randn(6, seed=4)
    perm = torch.tensor([2, 0, 1, 3, 5, 4])  # inside each group of 3
    loss, grad = loss_and_grad(rewards, r_hat)
    loss_p, grad_p = loss_and_grad(rewards[perm], r_hat[perm])
    assert torch.allclose(loss, loss_p, atol=1e-7) and torch.allclose(grad[perm], grad_p, atol=1e-7)
    normalized = crd.normalize_rewards(rewards.view(2, 3)).flatten()
    assert torch.allclose(crd.normalize_rewards(rewards[perm].view(2, 3)).flatten(), normalized[perm])


def test_theta_equal_old_gives_no_crd_gradient_when_rewards_tie_within_groups():
    v = randn(4, 2, 2, 2, seed=5)
    v_theta, u = v.clone().requires_grad_(True), randn(4, 2, 2, 2, seed=6)
    r_hat = crd.implicit_reward(v_theta, v.clone(), u)
    rewards = torch.tensor([0.3, 0.3, 0.9, 0.9])  # equal within each group of 2
    crd.crd_loss(r_hat, rewards, group_size=2).backward()
    assert torch.count_nonzero(v_theta.grad) == 0
    # ...and a gradient as soon as the rewards differ within a group
    v_theta.grad = None
    crd.crd_loss(crd.implicit_reward(v_theta, v.clone(), u), torch.tensor([0.3, 0.9, 0.9, 0.9]), 2).backward()
    assert v_theta.grad.abs().sum() > 0


def test_crd_gradient_raises_likelihood_of_above_average_samples():
    """One gradient step on Eq. (7) lowers theta's denoising error on the better sample of a group, raises it on
    the worse one: the sign that makes CRD a reward-maximiser."""
    u = torch.zeros(2, 1, 1, 1)
    v_old = torch.ones(2, 1, 1, 1)
    v_theta = v_old.clone().requires_grad_(True)
    loss = crd.crd_loss(crd.implicit_reward(v_theta, v_old, u, adaptive_norm=False), torch.tensor([1.0, 0.0]), 2)
    loss.backward()
    stepped = v_theta.detach() - 0.1 * v_theta.grad
    errors = (stepped - u).abs().flatten()
    assert errors[0] < 1.0 < errors[1]


def test_at_theta_equal_old_nft_gradient_is_sigma_times_crd_and_sigma_weighting_makes_them_equal():
    """At theta = old (beta_NFT = 1, both adaptive normalisations, prompt centring, no reward clipping), the gradient
    of DiffusionNFT's loss with respect to v_theta is sigma times CRD's, sample by sample: CRD with uniform time
    weighting gives the near-clean timesteps 1 / sigma times NFT's weight; --time-weighting sigma gives NFT's."""
    x0, eps, v_old = randn(8, 2, 2, 2, seed=1), randn(8, 2, 2, 2, seed=2), randn(8, 2, 2, 2, seed=3)
    sigma = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.3, 0.3, 0.3, 0.3])  # two passes' noise levels, one per group
    r = crd.normalize_rewards(torch.rand(2, 4, generator=torch.Generator().manual_seed(4))).flatten()
    assert 0.0 < r.min() and r.max() < 1.0  # no clipping, so the group mean of r~ is 0.5 and 2 r~ - 1 = 2 R

    def gradient(loss_of):
        v_theta = v_old.clone().requires_grad_(True)
        loss_of(v_theta).backward()
        return v_theta.grad

    def crd_of(weights):
        return lambda v: crd.crd_loss(crd.implicit_reward(v, v_old, eps - x0), r, 4, weights=weights)

    nft = gradient(lambda v: baselines.nft_loss(v, v_old, crd.interpolate(x0, eps, sigma), x0, sigma, r, beta=1.0))
    uniform, weighted = gradient(crd_of(None)), gradient(crd_of(sigma))
    assert nft.abs().max() > 1e-3
    assert torch.allclose(nft, sigma.view(-1, 1, 1, 1) * uniform, rtol=1e-4, atol=1e-7)
    assert torch.allclose(nft, weighted, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(nft, uniform, rtol=1e-2)


def test_crd_loss_weights_scale_each_sample_term():
    r_hat, rewards = torch.tensor([0.1, 0.3]), torch.tensor([0.4, 0.6])  # per-sample terms (2.5 x) 0.01 each
    assert crd.crd_loss(r_hat, rewards, 2, 2.0, weights=torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0125)
    assert crd.crd_loss(r_hat, rewards, 2, 2.0, weights=torch.ones(2)).item() == crd.crd_loss(r_hat, rewards, 2,
                                                                                            2.0).item()


def test_within_group_correlation_hand_values():
    y = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])  # second group constant: left out
    assert crd.within_group_correlation(torch.tensor([1.0, 2.0, 3.0, 0.0, 1.0, 2.0]), y, 3) == pytest.approx(1.0)
    assert crd.within_group_correlation(-y, y, 3) == pytest.approx(-1.0)
    # group 1: x = (1, 0, 1) against (0, 1, 2) -> centred (1/3, -2/3, 1/3)·(-1, 0, 1) = 0; group 2 perfectly ranked
    x = torch.tensor([1.0, 0.0, 1.0, 7.0, 8.0, 9.0])
    y = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    assert crd.within_group_correlation(x, y, 3) == pytest.approx(0.5)
    assert math.isnan(crd.within_group_correlation(torch.ones(4), y[:4], 2))


def test_ranking_agreement_hand_values():
    # group 1: estimates (1, 2, 3) against rewards (1, 3, 2): pairs 2>1 and 3>1 agree, 3>2 does not -> 2/3, rho 0.5
    # group 2: estimates (0, 0, 1) against (0, 1, 2): the tie counts 1/2 -> 2.5/3, rho = corr of ranks = 0.866
    result = diagnostics.ranking_agreement(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 1.0]),
                                   torch.tensor([1.0, 3.0, 2.0, 0.0, 1.0, 2.0]), 3)
    assert result["per_group_accuracy"] == pytest.approx([2 / 3, 2.5 / 3])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["accuracy_se"] == pytest.approx(abs(2 / 3 - 2.5 / 3) / 2)  # std of two values / sqrt(2)
    assert result["spearman"] == pytest.approx((0.5 + math.sqrt(3) / 2) / 2)
    # a group whose rewards tie has no pair to order, and is left out
    tied = diagnostics.ranking_agreement(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert tied["per_group_accuracy"][0] != tied["per_group_accuracy"][0] and tied["accuracy"] == 1.0


MIXTURE_MEANS, MIXTURE_STD = torch.tensor([-2.0, 2.0]), 0.5


def mixture_velocity(weights):
    """The exact rectified-flow velocity E[eps - x0 | x_sigma] of the 1-D mixture sum_k w_k N(m_k, 0.5^2), as a
    callable on (N, 1, 1, 1) tensors: the responsibilities of the noised components times each one's Gaussian
    velocity."""
    log_w, means, var0 = torch.tensor(weights).log(), MIXTURE_MEANS, MIXTURE_STD ** 2

    def v(x_sigma, sigma):
        s = sigma.view(-1, 1, 1, 1, 1)
        var = (1 - s) ** 2 * var0 + s ** 2
        centred = x_sigma[..., None] - (1 - s) * means
        responsibility = torch.softmax(log_w - centred ** 2 / (2 * var), dim=-1)
        return (responsibility * ((s - (1 - s) * var0) / var * centred - means)).sum(-1)
    return v


def test_implicit_reward_estimates_rank_samples_of_a_tilted_mixture_by_the_tilt():
    """Known answer: theta is the reference mixture tilted by exp(r) with r = 2 log 2 [x > 0] (weights 1/2, 1/2 ->
    1/5, 4/5), so log p_theta / p_ref is higher on every right-mode sample than on every left-mode one; against the
    tilt's reward the estimates order every pair (accuracy 1), against its negative none, and theta = reference
    gives estimates of exactly 0 (accuracy 0.5: chance)."""
    generator = torch.Generator().manual_seed(0)
    modes = torch.randint(0, 2, (256,), generator=generator) * 4.0 - 2.0
    x0 = (modes + MIXTURE_STD * torch.randn(256, generator=generator)).view(-1, 1, 1, 1)
    rewards = (x0.flatten() > 0).float()
    sigmas = torch.linspace(0.95, 0.05, 10)
    estimates = diagnostics.implicit_reward_estimates(
        mixture_velocity([0.2, 0.8]), {"ref": mixture_velocity([0.5, 0.5]), "self": mixture_velocity([0.2, 0.8])},
        x0, sigmas, draws=8, generator=torch.Generator().manual_seed(1), group_size=8)
    assert diagnostics.ranking_agreement(estimates["ref"][0], rewards, 8)["accuracy"] == 1.0
    assert diagnostics.ranking_agreement(estimates["ref"][0], -rewards, 8)["accuracy"] == 0.0
    assert estimates["self"][0].abs().max() == 0 and estimates["self"][1].abs().max() == 0
    assert diagnostics.ranking_agreement(estimates["self"][0], rewards, 8)["accuracy"] == 0.5
    assert (estimates["ref"][1] > 0).all()  # a standard error over draws
    with pytest.raises(ValueError, match="at least 2"):
        diagnostics.implicit_reward_estimates(mixture_velocity([0.5, 0.5]), {}, x0, sigmas, 1, generator, 8)


@pytest.mark.parametrize("time_weighting", ["uniform", "sigma", "normalized-sigma"])
def test_time_weighting_reaches_crd_pass(monkeypatch, time_weighting):
    """crd_pass weights Eq. (7) by lambda: with one sigma per pass, the reward term is the uniform one times sigma
    ('sigma') or times sigma / mean of the schedule ('normalized-sigma'); the KL term is unweighted."""
    weight = torch.nn.Parameter(torch.tensor(1.5))
    monkeypatch.setattr(crd, "velocity", lambda transformer, adapter, x_sigma, *args: x_sigma * (
        weight if adapter == "theta" else 1.0))
    x0, eps = randn(4, 1, 2, 2, seed=3), randn(4, 1, 2, 2, seed=4)
    sigmas, sigma = torch.tensor([0.9, 0.5, 0.1]), torch.full((4,), 0.9)
    micro = crd.Batch(x0, torch.zeros(4, 1, 1), torch.zeros(4, 1), torch.tensor([0.2, 0.8, 0.4, 0.6]),
                      torch.rand(4), torch.zeros(1, 1, 1), torch.zeros(1, 1), sigmas)

    def losses(mode):
        cfg = dataclasses.replace(crd.Config(), group_size=2, time_weighting=mode)
        result = crd.crd_pass(None, micro, crd.interpolate(x0, eps, sigma), sigma, eps - x0, cfg,
                              contextlib.nullcontext())
        return result.loss_reward.item(), result.loss_kl.item()

    (reward, kl), (uniform, uniform_kl) = losses(time_weighting), losses("uniform")
    factor = {"uniform": 1.0, "sigma": 0.9, "normalized-sigma": 0.9 / 0.5}[time_weighting]
    assert uniform > 0 and reward == pytest.approx(factor * uniform) and kl == pytest.approx(uniform_kl)


def test_ema_caps_and_a_frozen_reference_in_move_snapshots():
    cfg = crd.Config()  # the CPU default: both decays capped at 0.5
    params = {name: [torch.full((2,), value)] for name, value in (("theta", 1.0), ("old", 0.0), ("sampler", 0.0))}
    log = crd.move_snapshots(params, 10_000, cfg)
    assert log["ema/eta_old"] == log["ema/eta_sampler"] == 0.5 and log["ema/lag_old"] == 1.0
    assert params["old"][0].tolist() == [0.5, 0.5]
    frozen = dataclasses.replace(cfg, old_decay="0-1-0-1")
    log = crd.move_snapshots(params, 10_000, frozen)
    assert params["old"][0].tolist() == [0.5, 0.5] and log["ema/lag_old"] == math.inf
    assert crd.move_snapshots(params, 0, crd.sd35m_ocr())["ema/eta_old"] == 0.25  # the recipe: uncapped at 0.999


def test_gradient_split_splits_a_hand_made_gradient_and_leaves_backward_as_it_was():
    """Total loss 3 w0 + (-4 w0 + 2 w1): g_R = (3, 0), g_KL = (-4, 2), cosine -12 / (3 sqrt(20)); the probe runs
    before the backward, which then gives the total gradient (-1, 2) as without it."""
    w = torch.nn.Parameter(torch.zeros(2))
    loss_reward, loss_kl = 3 * w[0], -4 * w[0] + 2 * w[1]
    log = diagnostics.gradient_split(crd.Pass(loss_reward, loss_kl, None, None), [w], torch.tensor([0.7]))
    (loss_reward + loss_kl).backward()
    assert w.grad.tolist() == [-1.0, 2.0]
    assert log["grad/reward_norm"] == pytest.approx(3.0) and log["grad/kl_norm"] == pytest.approx(math.sqrt(20))
    assert log["grad/cos_reward_kl"] == pytest.approx(-12 / (3 * math.sqrt(20)))
    assert log["grad/sigma"] == pytest.approx(0.7)


@pytest.mark.parametrize("shared_timesteps", [True, False])
def test_update_shares_sigma_per_pass_when_asked_and_draws_noise_per_sample(monkeypatch, shared_timesteps):
    """With shared_timesteps every sample of a pass gets the same sigma, off one per sample; eps is drawn per sample
    (the K samples of a prompt get different eps). Read back from the x_sigma that reach the model."""
    seen = []
    weight = torch.nn.Parameter(torch.ones(()))

    def fake_velocity(transformer, adapter, x_sigma, sigma, embeds, pooled):
        if adapter == "theta":
            seen.append((x_sigma.clone(), sigma.clone()))
        return x_sigma * (weight if adapter == "theta" else 1.0)

    monkeypatch.setattr(crd, "velocity", fake_velocity)
    cfg = dataclasses.replace(crd.Config(), group_size=2, micro_batch_size=4, train_timesteps=2,
                              optimizer_steps_per_iteration=2, shared_timesteps=shared_timesteps)
    x0 = randn(8, 1, 2, 2, seed=3)
    batch = crd.Batch(x0, torch.zeros(8, 1, 1), torch.zeros(8, 1), torch.rand(8), torch.rand(8), torch.zeros(1, 1, 1),
                      torch.zeros(1, 1), torch.linspace(1, 0.1, 9))
    crd.update(None, {"theta": [weight]}, torch.optim.SGD([weight], lr=0.0), batch, cfg,
               torch.Generator().manual_seed(0), contextlib.nullcontext(), {"iteration": 0, "step": 0}, 2)
    assert len(seen) == 4  # 2 micro-batches x 2 timesteps
    for index, (x_sigma, sigma) in enumerate(seen):
        start = (index // 2) * 4
        eps = (x_sigma - (1 - sigma.view(-1, 1, 1, 1)) * x0[start:start + 4]) / sigma.view(-1, 1, 1, 1)
        if shared_timesteps:  # drawn per sample, two may coincide by chance: checked over all passes below
            assert len(set(sigma.tolist())) == 1
        same_in_groups = all(torch.allclose(eps[i], eps[i + 1], atol=1e-5) for i in (0, 2))
        assert not same_in_groups
    if not shared_timesteps:
        assert any(len(set(sigma.tolist())) > 1 for _, sigma in seen)


# ---------------------------------------------------------------------------------------------------------------
# Analytic check: CRD's own loss functions tilt a toy flow model to p exp(r / beta) / Z (Eq. 4)
# ---------------------------------------------------------------------------------------------------------------
TILT_OFFSET, TILT_SCALE, TILT_BETA = 3.0, 2.0, 1.0  # r(x) = 3 + 2 [x > 0]: right mode 1/2 -> e^2 / (1 + e^2)
TILT_TARGET = math.exp(TILT_SCALE / TILT_BETA) / (1 + math.exp(TILT_SCALE / TILT_BETA))  # 0.881
TILT_TOLERANCE = 0.04  # measured 0.862-0.872 on three seeds; broken losses land at 0.59 (no centring), 0.24 (sign)


class ToyVelocity(torch.nn.Module):
    """v(x, sigma) for 1-D data, as (N,) tensors."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                       torch.nn.SiLU(), torch.nn.Linear(64, 1))

    def forward(self, x, sigma):
        return self.net(torch.stack([x, sigma], dim=-1)).squeeze(-1)


@torch.no_grad()
def toy_sample(model, n, generator, steps=32):
    """Euler ODE from sigma = 1 (noise) to 0: dx/dsigma = v (Eq. 2)."""
    x, sigmas = torch.randn(n, generator=generator), torch.linspace(1, 0, steps + 1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * model(x, s.expand(n))
    return x


def toy_base_model():
    """Rectified flow (Eqs. 1-2) fitted to p = N(-2, 0.5^2) / 2 + N(2, 0.5^2) / 2."""
    torch.manual_seed(0)
    generator, model = torch.Generator().manual_seed(0), ToyVelocity()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(1500):
        modes = torch.randint(0, 2, (512,), generator=generator) * 4.0 - 2.0
        x0 = modes + 0.5 * torch.randn(512, generator=generator)
        eps, sigma = torch.randn(512, generator=generator), torch.rand(512, generator=generator)
        loss = ((model(crd.interpolate(x0, eps, sigma), sigma) - (eps - x0)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False)


def fit_tilt(base, seed=1, iterations=400, prompts=32, group_size=8, draws=32):
    """Fine-tune a copy of `base` with crd.implicit_reward + crd.crd_loss (raw rewards, no Eq. 6) against the
    frozen base (old = base); return (fraction of 8000 samples in the right mode, their mean).

    r^ is the ELBO difference with its exact weight (1 - sigma) / sigma on squared velocity errors, averaged over
    `draws` stratified sigmas per sample, so that beta r^ estimates log p_theta / p_base and the optimum of Eq. (7)
    is the tilt of Eq. (4). Samples come from the frozen base (a decoupled sampler at its slowest): on-policy, a
    reward offset has zero expected gradient anyway, so only off-policy samples show that centring removes Z(c).
    """
    theta, generator = copy.deepcopy(base).requires_grad_(True), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(theta.parameters(), lr=2e-3)
    for _ in range(iterations):
        x0 = toy_sample(base, prompts * group_size, generator)  # off-policy: a frozen sampler (the base)
        rewards = TILT_OFFSET + TILT_SCALE * (x0 > 0).float()
        x0 = x0.repeat(draws)
        eps = torch.randn(len(x0), generator=generator)
        strata = torch.arange(draws).repeat_interleave(prompts * group_size)
        sigma = ((strata + torch.rand(len(x0), generator=generator)) / draws).clamp(1e-3, 1 - 1e-3)
        x_sigma, u = crd.interpolate(x0, eps, sigma), eps - x0
        w = ((1 - sigma) / sigma).sqrt()  # ELBO weight, applied as sqrt on both errors
        r_hat = crd.implicit_reward((w * theta(x_sigma, sigma))[:, None], (w * base(x_sigma, sigma))[:, None],
                                    (w * u)[:, None], adaptive_norm=False)
        loss = crd.crd_loss(r_hat.view(draws, -1).mean(0), rewards, group_size, beta=TILT_BETA)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = toy_sample(theta, 8000, generator)
    return (x > 0).float().mean().item(), x.mean().item()


@pytest.fixture(scope="module")
def toy_base():
    return toy_base_model()


def test_crd_loss_tilts_a_toy_flow_to_the_analytic_optimum_of_eq4(toy_base):
    right_weight, mean = fit_tilt(toy_base)
    assert abs(right_weight - TILT_TARGET) < TILT_TOLERANCE
    assert abs(mean - 2.0 * (2 * TILT_TARGET - 1)) < 0.2  # mixture mean 2 w - 2 (1 - w) = 1.52


@pytest.mark.parametrize("broken", ["no centring", "flipped implicit reward"])
def test_the_analytic_tilt_check_fails_when_the_loss_is_broken(toy_base, monkeypatch, broken):
    if broken == "no centring":  # off-policy samples + a reward offset: Z(c) no longer cancels
        monkeypatch.setattr(crd, "group_center", lambda x, *args, **kwargs: x)
    else:
        implicit_reward = crd.implicit_reward
        monkeypatch.setattr(crd, "implicit_reward", lambda *args, **kwargs: -implicit_reward(*args, **kwargs))
    right_weight, _ = fit_tilt(toy_base)
    assert abs(right_weight - TILT_TARGET) > 0.2


# ---------------------------------------------------------------------------------------------------------------
# The embedded model and the LoRA adapters
# ---------------------------------------------------------------------------------------------------------------
def test_embedded_model_loads_offline_and_samples():
    pipe = plumbing.load_pipeline(crd.TINY_MODEL)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.in_channels == 4
    embeds, pooled = crd.encode_prompts(pipe, ['"abc"', '"hello"'], 2)
    latents = crd.sample_latents(pipe, embeds, pooled, [0, 1], 32, 96, 3, 1.0, 2)
    assert latents.shape == (2, 4, 16, 48)
    images = crd.decode_latents(pipe, latents)
    assert [im.size for im in images] == [(96, 32)] * 2


def test_rollouts_in_chunks_match_one_batch():
    pipe = plumbing.load_pipeline(crd.TINY_MODEL)
    crd.add_lora_adapters(pipe.transformer, 4, 8, crd.Config().lora_targets)
    prompts, seeds = ['"abc"', '"hello"'], [5, 6, 7, 8]
    whole = crd.rollout(pipe, prompts, seeds, crd.Config(group_size=2, num_steps=3), contextlib.nullcontext())
    split = crd.rollout(pipe, prompts, seeds, crd.Config(group_size=2, num_steps=3, sample_batch_size=3),
                        contextlib.nullcontext())
    assert torch.allclose(whole[0], split[0], atol=1e-5) and not torch.allclose(whole[0][0], whole[0][1])
    assert torch.equal(whole[1], split[1]) and len(split[3]) == 4


def test_readme_snippet_loads_the_embedded_model_with_plain_diffusers(tmp_path, monkeypatch):
    """The README's plain-diffusers lines, run as written (from the repository root), on a LoRA a run saved."""
    crd.main(tiny_config(tmp_path, iterations=1))
    readme = open(os.path.join(os.path.dirname(crd.__file__), "README.md")).read()
    blocks = [block.split("```")[0] for block in readme.split("```python\n")[1:]]
    snippet = next(block for block in blocks if "from_pretrained(\"assets/tiny-sd3-text\"" in block)
    assert "load_lora_weights" in snippet
    snippet = snippet.replace("runs/crd-tiny-ocr/lora", str(tmp_path / "test" / "lora"))
    snippet = snippet.replace('"grid.png"', repr(str(tmp_path / "grid.png")))
    monkeypatch.chdir(os.path.dirname(crd.__file__))
    namespace = {}
    exec(snippet, namespace)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (4 * 96, 32) and len(namespace["images"]) == 4
    assert namespace["pipe"].transformer.peft_config  # the LoRA was loaded


def test_lora_adapters_start_equal_and_switch():
    pipe = plumbing.load_pipeline(crd.TINY_MODEL)
    params = crd.add_lora_adapters(pipe.transformer, 4, 8, "to_q,to_v")
    assert len(params["theta"]) == len(params["old"]) == len(params["sampler"]) > 0
    x, sigma = randn(2, 4, 16, 48, seed=7), torch.tensor([0.5, 0.9])
    embeds, pooled = crd.encode_prompts(pipe, ['"abc"', '"xyz"'], 2)
    with torch.no_grad():
        v_pre = crd.velocity(pipe.transformer, None, x, sigma, embeds, pooled)
        v_old = crd.velocity(pipe.transformer, "old", x, sigma, embeds, pooled)
        assert torch.equal(v_pre, v_old)  # LoRA B = 0 at the start: every adapter is the pretrained model
        for p in params["theta"]:
            p.add_(0.05)
        v_theta = crd.velocity(pipe.transformer, "theta", x, sigma, embeds, pooled)
        assert not torch.allclose(v_theta, v_old)
        assert torch.equal(crd.velocity(pipe.transformer, "old", x, sigma, embeds, pooled), v_old)
    crd.use_adapter(pipe.transformer, "theta")
    assert all(p.requires_grad for p in params["theta"]) and not any(p.requires_grad for p in params["old"])


def test_prompt_cache_serves_single_prompt_encodings_and_drops_the_least_recent():
    pipe = plumbing.load_pipeline(crd.TINY_MODEL)
    cache, prompts = crd.PromptCache(2), ['"abc"', '"xyz"', '"abc"']
    embeds, pooled = crd.encode_prompts(pipe, prompts, 2, cache)
    for i, prompt in enumerate(prompts):
        alone, alone_pooled = crd.encode_prompts(pipe, [prompt], 2)
        assert torch.equal(embeds[i], alone[0]) and torch.equal(pooled[i], alone_pooled[0])
    assert cache.encode_one.cache_info()[:2] == (1, 2)  # hits, misses: '"abc"' was encoded once
    crd.encode_prompts(pipe, ['"new"', '"abc"'], 2, cache)  # '"new"' drops '"xyz"', the least recently used
    assert cache.encode_one.cache_info()[:2] == (2, 3)
    crd.encode_prompts(pipe, ['"xyz"'], 2, cache)
    assert cache.encode_one.cache_info()[:2] == (2, 4)  # '"xyz"' had been dropped: encoded again


# ---------------------------------------------------------------------------------------------------------------
# main() end to end: exact resume, the objectives, the presets, non-finite steps
# ---------------------------------------------------------------------------------------------------------------
def test_main_end_to_end_then_exact_resume(tmp_path):
    straight = crd.main(tiny_config(tmp_path / "a", iterations=4, eval_rewards="ink"))
    assert [m["iteration"] for m in straight] == [0, 1, 2, 3]
    run = tmp_path / "a" / "test"
    for name in ("metrics.jsonl", "checkpoint.pt", "reward_curve.png", "diagnostics.png", "samples_0000.png",
                 "eval_0004.png"):
        assert (run / name).is_file(), name
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/mean", "loss/crd", "loss/kl", "ema/eta_old", "time/sample", "time/train", "crd/corr",
            "crd/explained", "crd/corr_fresh", "ema/lag_old", "ema/lag_sampler"} <= set(logged[0])
    # before any update theta = old, so r^ = 0 ranks nothing; after one iteration it ranks fresh samples
    assert math.isnan(logged[0]["crd/corr_fresh"]) and math.isfinite(logged[1]["crd/corr_fresh"])
    assert "eval/reward" in logged[0] and "eval/reward" in logged[-1]
    assert logged[0]["eval/ink"] == pytest.approx(straight[0]["eval/ink"]) and 0 < logged[0]["eval/ink"] < 1
    # the implicit-reward check: at iteration 0 theta = old = pretrained, so every estimate is 0 (chance)
    assert logged[0]["eval/diag/implicit_accuracy_pretrained"] == logged[0]["eval/diag/implicit_accuracy_old"] == 0.5
    assert 0 <= logged[-1]["eval/diag/implicit_accuracy_pretrained"] <= 1
    eta = logged[0]["ema/eta_old"]
    assert logged[0]["ema/lag_old"] == pytest.approx(eta / (1 - eta))

    # the same run stopped after two iterations and resumed ends bitwise identical, also when it was killed while
    # writing a line of metrics.jsonl (a torn last line, dropped on resume)
    crd.main(tiny_config(tmp_path / "b", iterations=2, eval_rewards="ink"))
    with open(tmp_path / "b" / "test" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2, "reward/mean": 0.4')
    resumed = crd.main(tiny_config(tmp_path / "b", iterations=4, resume="auto", eval_rewards="ink"))
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3]
    logged_b = [json.loads(line) for line in (tmp_path / "b" / "test" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if not k.startswith(("time/", "eval/"))} for m in logged_b] == [
        {k: v for k, v in m.items() if not k.startswith(("time/", "eval/"))} for m in logged]  # b evaluated at 2
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "test" / "checkpoint.pt", weights_only=True)
    assert a["state"] == b["state"] == {"iteration": 4, "step": 8}
    for name in crd.ADAPTERS:
        assert all(torch.equal(x, y) for x, y in zip(a["lora"][name], b["lora"][name])), name
    assert lora_moved(a["lora"]["theta"])

    # the saved LoRA, loaded the diffusers way, reproduces theta's velocity (weights and alpha / r scale)
    pipe = plumbing.load_pipeline(crd.TINY_MODEL)
    params = crd.add_lora_adapters(pipe.transformer, 4, 8, crd.Config().lora_targets)
    with torch.no_grad():
        for p, t in zip(params["theta"], a["lora"]["theta"]):
            p.copy_(t)
    loaded = plumbing.load_pipeline(crd.TINY_MODEL)
    loaded.load_lora_weights(str(run / "lora"))
    x, sigma = randn(2, 4, 16, 48, seed=8), torch.tensor([0.3, 0.8])
    embeds, pooled = crd.encode_prompts(pipe, ['"abc"', '"xyz"'], 2)
    with torch.no_grad():
        v_theta = crd.velocity(pipe.transformer, "theta", x, sigma, embeds, pooled)
        v_loaded = loaded.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                      pooled_projections=pooled, return_dict=False)[0]
        v_pre = crd.velocity(pipe.transformer, None, x, sigma, embeds, pooled)
    assert torch.allclose(v_loaded, v_theta, atol=1e-5) and not torch.allclose(v_loaded, v_pre, atol=1e-3)


@pytest.mark.parametrize("objective", ["nft", "anchor"])
def test_baseline_and_reward_free_control_objectives_train_end_to_end(tmp_path, objective):
    metrics = crd.main(tiny_config(tmp_path, iterations=1, objective=objective, adaptive_kl=objective != "anchor"))
    loss = metrics[0][f"loss/{objective}"]
    assert (loss > 0) if objective == "nft" else (loss == 0)  # the control has no reward term at all
    assert metrics[0]["loss/kl"] > 0
    checkpoint = torch.load(tmp_path / "test" / "checkpoint.pt", weights_only=True)
    assert lora_moved(checkpoint["lora"]["theta"])


def test_the_gradient_split_probe_logs_the_split_and_changes_nothing_the_run_trains(tmp_path):
    plain = crd.main(tiny_config(tmp_path / "plain", iterations=1))
    probed = crd.main(tiny_config(tmp_path / "probed", iterations=1), probe=diagnostics.gradient_split)
    assert {k: v for k, v in probed[0].items() if not k.startswith(("grad/", "time/"))} == {
        k: v for k, v in plain[0].items() if not k.startswith("time/")}
    assert probed[0]["grad/reward_norm"] > 0 and probed[0]["grad/kl_norm"] > 0
    assert -1 <= probed[0]["grad/cos_reward_kl"] <= 1
    loras = [torch.load(tmp_path / run / "test" / "checkpoint.pt", weights_only=True)["lora"]["theta"]
             for run in ("plain", "probed")]
    assert all(torch.equal(a, b) for a, b in zip(*loras))


def test_zero_decays_make_both_snapshots_copies_of_theta(tmp_path):
    """eta 0 (no slow reference: --old-decay 0-0-0-0; no decoupled sampler: --sampler-decay 0-0-0-0) leaves old and
    sampler equal to theta after every iteration."""
    metrics = crd.main(tiny_config(tmp_path, iterations=1, old_decay="0-0-0-0", sampler_decay="0-0-0-0"))
    assert metrics[0]["ema/eta_old"] == metrics[0]["ema/eta_sampler"] == 0.0
    lora = torch.load(tmp_path / "test" / "checkpoint.pt", weights_only=True)["lora"]
    assert lora_moved(lora["theta"])
    for name in ("old", "sampler"):
        assert all(torch.equal(a, b) for a, b in zip(lora[name], lora["theta"])), name


def test_nonfinite_loss_stops_with_iteration_and_step(tmp_path, monkeypatch):
    monkeypatch.setattr(crd, "distillation_loss", lambda *args, **kwargs: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite loss nan at iteration 0, optimizer step 0"):
        crd.main(tiny_config(tmp_path / "stop", iterations=1))


def test_nonfinite_weights_are_never_saved_and_the_last_finite_checkpoint_is_named(tmp_path, monkeypatch):
    """Weights that turn inf / nan in an iteration stop the run before that iteration saves anything."""
    move = crd.move_snapshots

    def poisoned(params, step, cfg):  # theta becomes non-finite in iteration 1 (optimizer steps 3-4)
        if step >= 4:
            params["theta"][0].data.fill_(math.inf)
        return move(params, step, cfg)

    monkeypatch.setattr(crd, "move_snapshots", poisoned)
    with pytest.raises(plumbing.NonFiniteWeights, match="non-finite LoRA weights of theta after iteration 1, "
                                                          "optimizer step 4 \\(not saved\\)"):
        crd.main(tiny_config(tmp_path, iterations=3))
    run = tmp_path / "test"
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["iteration"] == 1 and all(torch.isfinite(t).all() for t in checkpoint["lora"]["theta"])
    assert not (run / "lora").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert plumbing.last_good_state(str(run / "checkpoint.pt")) == (
        f"the last good state is {run / 'checkpoint.pt'}, at iteration 1 (resume with --resume auto, with other "
        f"settings, e.g. a smaller --learning-rate)")
    assert plumbing.last_good_state(str(tmp_path / "none.pt")).startswith("no checkpoint was written before it")


def test_sd35m_code_path_runs_on_a_tiny_pipeline_with_its_layout(tmp_path):
    model = tmp_path / "tiny-sd35m-layout"
    sd35m_layout_pipeline(str(model))
    pipe = plumbing.load_pipeline(str(model))  # reloads offline, all three text encoders present
    assert pipe.text_encoder_3 is not None and pipe.vae.config.latent_channels == 16
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign "abc"\na sign "xyz"\n')
    # the sd35m_ocr preset (bf16 autocast, gradient checkpointing, K groups per micro-batch, 9 -> 2 timesteps...)
    # with only the sizes made tiny
    cfg = dataclasses.replace(crd.sd35m_ocr(), model=str(model), prompts=str(prompts), eval_prompts=str(prompts),
                              output_dir=str(tmp_path), height=32, width=32, max_sequence_length=4,
                              prompts_per_iteration=2, group_size=2, micro_batch_size=2, num_steps=3,
                              train_timesteps=1, eval_num_steps=2, eval_count=2, iterations=1, reward="ink",
                              lora_rank=4, lora_alpha=8, text_encoders_on_cpu=True)
    assert cfg.prompt_cache > 0  # the preset caches text embeddings
    metrics = crd.main(cfg)
    assert len(metrics) == 1 and metrics[0]["train/step"] == 2
    assert all(math.isfinite(metrics[0][k]) for k in ("loss/crd", "loss/kl", "eval/reward"))
    assert (tmp_path / cfg.run_name / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_port_options_timesteps_sigmas_prompt_cap_and_lora_targets(tmp_path):
    """The first author's port, as sd35m_ocr follows it (docs/port_comparison.md): its discrete sampler's 20 steps of
    a 10-step schedule (the same for every sample and seed), its sigma spacing under SD3.5's shift 3, the first N
    training prompts, and LoRA on the joint attention only (none on SD3.5-M's attn2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    cfg = dataclasses.replace(crd.sd35m_ocr(), micro_batch_size=4, group_size=2)
    for seed in (0, 42):
        index = crd.draw_timesteps(8, 10, cfg, torch.Generator().manual_seed(seed))
        assert index.tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]] * 8
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    port = crd.training_sigmas(scheduler, 10, 1.0, "port")
    assert port.tolist() == pytest.approx([1.0, 0.9643, 0.9231, 0.875, 0.8182, 0.75, 0.6667, 0.5625, 0.4286, 0.25],
                                          abs=1e-4)
    assert crd.training_sigmas(scheduler, 10, 0.99)[-1].item() == pytest.approx(0.278, abs=1e-3)  # diffusers' own
    prompts = tmp_path / "train.txt"
    prompts.write_text("".join(f'a sign "w{i}"\n' for i in range(20)))
    capped = dataclasses.replace(crd.Config(), prompts=str(prompts), max_prompts=12)
    assert plumbing.check_inputs(capped)[0] == [f'a sign "w{i}"' for i in range(12)]  # the first 12, in file order
    with pytest.raises(crd.InputError, match="fewer than --prompts-per-iteration"):
        plumbing.check_inputs(dataclasses.replace(capped, max_prompts=4))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
                                        dual_attention_layers=(0,))
    crd.add_lora_adapters(transformer, 2, 4, crd.LORA_TARGETS)
    adapted = {n.split(".lora_A")[0] for n, _ in transformer.named_parameters() if ".lora_A.theta" in n}
    assert "transformer_blocks.0.attn.to_q" in adapted and "transformer_blocks.0.attn.add_q_proj" in adapted
    assert not any(".attn2." in n for n in adapted)
    assert len(adapted) == 8 * 2 - 1  # 8 projections x 2 blocks; the last block has no context output projection


def test_full_size_bench_runs_the_sd35m_code_path_at_tiny_scale(capsys):
    """bench/full_size.py builds SD3.5-M's layout from the shipped configs; --scale tiny runs it on the CPU."""
    import importlib.util

    path = os.path.join(os.path.dirname(crd.__file__), "bench", "full_size.py")
    spec = importlib.util.spec_from_file_location("full_size", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.config("transformer", "full")["num_layers"] == 24  # the public SD3.5-M config, unshrunk
    metrics = bench.main(["--scale", "tiny", "--iterations", "2"])
    assert [m["iteration"] for m in metrics] == [0, 1] and metrics[1]["train/step"] == 4
    out = capsys.readouterr().out
    assert "seconds per iteration" in out and "images/s" in out and "1,018 OCR test prompts" in out
    assert "the preset's iteration (1152 images, 960 passes)" in out  # per-image and per-pass times, scaled
