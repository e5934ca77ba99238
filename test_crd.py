"""Tests for crd.py and reward.py: CPU, offline, tiny shapes, explicit generators.

Hand-computed values of each pure function, the invariances that make CRD correct (a per-prompt reward shift
changes nothing; theta = old gives a zero implicit reward; the loss vanishes when beta R^ = R; permuting a group
permutes the per-sample terms), and main() end to end on the embedded model, with an exact resume.
"""
import contextlib
import hashlib
import copy
import dataclasses
import math
import json
import os
import string
import subprocess
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a model hub

import numpy as np
import pytest
import torch
from PIL import Image

import crd
import plumbing
import reward
from reward import (GENEVAL_COLOURS, GENEVAL_CROP_BACKGROUND, GENEVAL_OBJECTS, Detection, clip_colour_classifier,
                    clipscore_reward, geneval_check, geneval_filter, geneval_relations, geneval_reward,
                    mask2former_instances, mask2former_labels, pickscore_reward, validate_geneval_metadata)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


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


def test_nft_baseline_loss_hand_values():
    # one sample, x0 = (0, 0), sigma = 0.5, x_sigma = (1, 1); v_old = (2, 0), v_theta = (2, 2)
    x0, x_sigma, sigma = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.tensor([0.5])
    v_old, v_theta = torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[2.0, 2.0]]]])
    # beta 1: v+ = v_theta -> x0+ = (0, 0), L+ = 0; v- = 2 v_old - v_theta = (2, -2) -> x0- = (0, 2), w- = 1, L- = 2
    loss = crd.nft_loss(v_theta, v_old, x_sigma, x0, sigma, torch.tensor([0.25]), beta=1.0)
    assert loss.item() == pytest.approx(5 * (0.25 * 0 + 0.75 * 2))
    # beta 0.5: v+ = (2, 1) -> err (0, .5), w .25, L+ = .5; v- = (2, -1) -> err (0, 1.5), w .75, L- = 1.5
    loss = crd.nft_loss(v_theta, v_old, x_sigma, x0, sigma, torch.tensor([0.25]), beta=0.5)
    assert loss.item() == pytest.approx(5 * (0.25 * 0.5 / 0.5 + 0.75 * 1.5 / 0.5))
    # at v_theta = v_old a high reward pulls x0+ toward x0, a low one pushes it away
    for r, closer in ((1.0, True), (0.0, False)):
        v = v_old.clone().requires_grad_(True)
        crd.nft_loss(v, v_old, x_sigma, x0, sigma, torch.tensor([r])).backward()
        stepped = x_sigma - sigma * (v.detach() - 0.01 * v.grad)
        assert ((stepped - x0).abs().sum() < (x_sigma - sigma * v_old - x0).abs().sum()) == closer


def test_ema_schedules_of_eq8():
    eta_old = lambda s: crd.ema_decay(s, 0.25, 0.005, 0.999)  # noqa: E731
    eta_samp = lambda s: crd.ema_decay(s, 0.0, 0.0075, 0.999, delay=75)  # noqa: E731
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

    nft = gradient(lambda v: crd.nft_loss(v, v_old, crd.interpolate(x0, eps, sigma), x0, sigma, r, beta=1.0))
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


@pytest.mark.parametrize("shared_timesteps,group_noise", [(True, True), (False, False)])
def test_update_shares_sigma_per_pass_and_noise_per_group_when_asked(monkeypatch, shared_timesteps, group_noise):
    """With shared_timesteps every sample of a pass gets the same sigma; with group_noise the K samples of a prompt
    get the same eps; off, both are drawn per sample. Read back from the x_sigma that reach the model."""
    seen = []
    weight = torch.nn.Parameter(torch.ones(()))

    def fake_velocity(transformer, adapter, x_sigma, sigma, embeds, pooled):
        if adapter == "theta":
            seen.append((x_sigma.clone(), sigma.clone()))
        return x_sigma * (weight if adapter == "theta" else 1.0)

    monkeypatch.setattr(crd, "velocity", fake_velocity)
    cfg = dataclasses.replace(crd.Config(), group_size=2, micro_batch_size=4, train_timesteps=2,
                              optimizer_steps_per_iteration=2, shared_timesteps=shared_timesteps,
                              group_noise=group_noise)
    x0 = randn(8, 1, 2, 2, seed=3)
    batch = {"x0": x0, "prompt_embeds": torch.zeros(8, 1, 1), "pooled": torch.zeros(8, 1),
             "negative_embeds": torch.zeros(1, 1, 1), "negative_pooled": torch.zeros(1, 1),
             "rewards_normalized": torch.rand(8), "rewards_kl": torch.rand(8), "sigmas": torch.linspace(1, 0.1, 9)}
    crd.update(None, {"theta": [weight]}, torch.optim.SGD([weight], lr=0.0), batch, cfg,
               torch.Generator().manual_seed(0), contextlib.nullcontext(), (0, 0), 2)
    assert len(seen) == 4  # 2 micro-batches x 2 timesteps
    for index, (x_sigma, sigma) in enumerate(seen):
        start = (index // 2) * 4
        eps = (x_sigma - (1 - sigma.view(-1, 1, 1, 1)) * x0[start:start + 4]) / sigma.view(-1, 1, 1, 1)
        if shared_timesteps:  # drawn per sample, two may coincide by chance: checked over all passes below
            assert len(set(sigma.tolist())) == 1
        same_in_groups = all(torch.allclose(eps[i], eps[i + 1], atol=1e-5) for i in (0, 2))
        assert same_in_groups == group_noise
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
# Config and input validation
# ---------------------------------------------------------------------------------------------------------------
def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="group-size 1"):
        plumbing.check_config(dataclasses.replace(crd.Config(), group_size=1))
    with pytest.raises(ValueError, match="not a multiple of --group-size"):
        plumbing.check_config(dataclasses.replace(crd.Config(), micro_batch_size=12))
    with pytest.raises(ValueError, match="optimizer steps"):
        plumbing.check_config(dataclasses.replace(crd.Config(), train_timesteps=1, optimizer_steps_per_iteration=4))
    plumbing.check_config(crd.Config())
    plumbing.check_config(crd.sd35m_ocr())


def test_check_inputs_rejects_unknown_reward_and_unquoted_prompts(tmp_path):
    with pytest.raises(ValueError, match="known rewards: .*ocr"):
        plumbing.check_inputs(dataclasses.replace(crd.Config(), reward="aesthetic"))
    bad = tmp_path / "prompts.txt"
    bad.write_text('"abc"\nno quotes here\n')
    with pytest.raises(ValueError, match="prompt 2"):
        plumbing.check_inputs(dataclasses.replace(crd.Config(), prompts=str(bad)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        plumbing.check_inputs(dataclasses.replace(crd.Config(), prompts=str(empty)))


def test_cli_exposes_every_config_field():
    cfg, _ = plumbing.parse_args(crd.Config, crd.PRESETS, ["--group-size", "4", "--no-adaptive-kl", "--beta", "0.5"])
    assert (cfg.group_size, cfg.adaptive_kl, cfg.beta) == (4, False, 0.5)
    cfg, _ = plumbing.parse_args(crd.Config, crd.PRESETS, ["--preset", "sd35m_ocr"])
    assert (cfg.group_size, cfg.prompts_per_iteration, cfg.height) == (24, 48, 512)
    assert set(plumbing.field_docs(crd.Config)) == {f.name for f in dataclasses.fields(crd.Config)}


@pytest.mark.parametrize("preset", sorted(crd.PRESETS))
def test_help_prints_and_exits_zero_for_every_preset(preset):
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(crd.__file__), "crd.py"), "--preset", preset,
                          "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--group-size" in out.stdout and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------
def test_ocr_score_formula():
    assert reward.ocr_score("Hello World", "helloworld") == 1.0  # spaces and case are ignored
    assert reward.ocr_score("xxhelloxx", "hello") == 1.0  # substring
    assert reward.ocr_score("hallo", "hello") == pytest.approx(0.8)  # one edit in five
    assert reward.ocr_score("completely different text", "abc") == 0.0  # distance capped at len(target)
    assert reward.ocr_score("", "abc") == 0.0
    assert reward.ocr_target('A sign that says "Open Late" and "x"') == "Open Late"
    with pytest.raises(ValueError, match="no quoted OCR target"):
        reward.ocr_target("no quotes")
    with pytest.raises(ValueError, match="known rewards"):
        reward.make_reward("nope")


@pytest.mark.parametrize("name,detect_text", [("ocr", True), ("ocr", False), ("ppocr", False)])
def test_ocr_rewards_read_clean_renders_and_score_blank_zero(name, detect_text):
    """Both engines (EasyOCR, the trained reward; PP-OCRv4, the unseen metric), with and without text detection."""
    from PIL import Image, ImageFont
    from tools.pretrain_tiny import font_path, render

    font = ImageFont.truetype(font_path(), 20)
    words = ["hello", "crd", "text", "quick"]
    fn = reward.make_reward(name, detect_text=detect_text)
    rewards, info = fn([render(w, font) for w in words] + [Image.new("RGB", (96, 32), "white")],
                       [f'"{w}"' for w in words] + ['"blank"'])
    assert rewards.shape == (5,) and rewards.dtype == torch.float32
    assert rewards[:4].mean() >= 0.9 and rewards[4] == 0.0 and info["ocr/failures"] == 0


def test_reward_specs_weighted_sums_and_per_reward_prompt_checks():
    assert reward.parse_reward_spec("ocr") == [("ocr", 1.0)]
    assert reward.parse_reward_spec("ocr:1,pickscore:0.5") == [("ocr", 1.0), ("pickscore", 0.5)]
    for bad, message in (("ocr:0", "number > 0"), ("ocr:x", "number > 0"), ("ocr,ocr", "twice"),
                         ("nope:1", "known rewards")):
        with pytest.raises(ValueError, match=message):
            reward.parse_reward_spec(bad)
    reward.check_prompts("ocr:1,clipscore:1", ['"abc"', 'a sign "xyz"'])
    with pytest.raises(ValueError, match="prompt 12 cannot be scored by the ocr reward"):
        reward.check_prompts("ocr", ['"abc"', "no quotes"], start=11)
    line = json.dumps({"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]})
    reward.check_prompts("geneval", [line])
    assert reward.prompt_text(line) == "a photo of a dog"
    with pytest.raises(ValueError, match="prompt 1 cannot be scored by the geneval reward"):
        reward.check_prompts("geneval", ["a photo of a dog"])  # plain text has no metadata


def test_weighted_sum_of_rewards_logs_each_term_and_stays_in_range(tmp_path):
    """--reward ocr:1,ink:0.5 trains on (r_ocr + 0.5 r_ink) / 1.5 and logs both terms, for 2 iterations."""
    metrics = crd.main(tiny_config(tmp_path, reward="ocr:1,ink:0.5", ocr_detection=False))
    assert len(metrics) == 2
    for m in metrics:
        assert m["reward/mean"] == pytest.approx((m["reward/ocr"] + 0.5 * m["reward/ink"]) / 1.5, abs=1e-5)
        assert 0 <= m["reward/mean"] <= 1 and "reward/ocr/exact" in m


def test_json_lines_prompts_reach_the_reward_whole_and_the_encoder_as_text(tmp_path, monkeypatch):
    """A GenEval-format prompt file: the reward gets each JSON line (its metadata intact), the text encoder gets
    its "prompt" field, and each reward's own prompt check runs before any model loads."""
    lines = [json.dumps({"prompt": f"a photo of {n} dog", "tag": "counting", "include": [{"class": "dog",
                         "count": c}], "exclude": [{"class": "dog", "count": c + 1}]}) for n, c in (("two", 2),
                                                                                                  ("three", 3))]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    seen, encoded = [], []

    def recorder(device="cpu", detect_text=True):
        def fn(images, batch_prompts):
            seen.extend(batch_prompts)
            return torch.full((len(images),), 0.5), {}
        return fn

    monkeypatch.setitem(reward.REWARDS, "recorder", recorder)
    monkeypatch.setitem(reward.PROMPT_CHECKS, "recorder", reward.geneval_metadata)
    original = crd.PromptCache.__call__
    monkeypatch.setattr(crd.PromptCache, "__call__", lambda self, pipe, p, n: (encoded.extend(p), original(
        self, pipe, p, n))[1])
    cfg = tiny_config(tmp_path, reward="recorder", prompts=str(prompts), eval_prompts=str(prompts), iterations=1,
                      prompt_cache=8)
    crd.main(cfg)
    assert set(seen) == set(lines) and all(reward.geneval_metadata(p)["tag"] == "counting" for p in seen)
    with pytest.raises(crd.InputError, match="cannot be scored by the recorder reward"):
        plumbing.check_inputs(dataclasses.replace(cfg, eval_prompts=str(tmp_path / "plain.txt")) if (
            tmp_path / "plain.txt").write_text('"abc"\n') else None)


def test_ink_reward_is_deterministic_and_in_range():
    from PIL import Image

    fn, images = reward.make_reward("ink"), [Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black"),
                                             Image.new("RGB", (8, 8), (100, 150, 200))]
    rewards, _ = fn(images, ["a", "b", "c"])
    assert rewards[:2].tolist() == [0.0, 1.0] and 0 < rewards[2] < 1
    assert torch.equal(fn(images, ["a", "b", "c"])[0], rewards)  # a second call, same images: same rewards
    assert torch.equal(reward.make_reward("ink")(images[::-1], ["c", "b", "a"])[0], rewards.flip(0))


# ---------------------------------------------------------------------------------------------------------------
# The embedded model, LoRA adapters, main() end to end
# ---------------------------------------------------------------------------------------------------------------
def tiny_config(tmp_path, **overrides):
    values = dict(run_name="test", output_dir=str(tmp_path), reward="ink", iterations=2, prompts_per_iteration=2,
                  group_size=2, micro_batch_size=2, train_timesteps=1, num_steps=3, eval_num_steps=3, eval_count=4,
                  eval_every=0, sample_every=1, checkpoint_every=1, lora_rank=4, lora_alpha=8, learning_rate=1e-2,
                  eval_rewards="")
    values.update(overrides)
    return dataclasses.replace(crd.Config(), **values)


def test_embedded_model_loads_offline_and_samples():
    pipe = crd.load_pipeline(crd.TINY_MODEL)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.in_channels == 4
    embeds, pooled = crd.encode_prompts(pipe, ['"abc"', '"hello"'], 2)
    latents = crd.sample_latents(pipe, embeds, pooled, [0, 1], 32, 96, 3, 1.0, 2)
    assert latents.shape == (2, 4, 16, 48)
    images = crd.decode_latents(pipe, latents)
    assert [im.size for im in images] == [(96, 32)] * 2


def test_rollouts_in_chunks_match_one_batch():
    pipe = crd.load_pipeline(crd.TINY_MODEL)
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
    snippet = readme.split("runs exactly these lines):\n\n```python\n")[1].split("```")[0]
    assert "from_pretrained(\"assets/tiny-sd3-text\"" in snippet and "load_lora_weights" in snippet
    snippet = snippet.replace("runs/crd-tiny-ocr/lora", str(tmp_path / "test" / "lora"))
    snippet = snippet.replace('"grid.png"', repr(str(tmp_path / "grid.png")))
    monkeypatch.chdir(os.path.dirname(crd.__file__))
    namespace = {}
    exec(snippet, namespace)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (4 * 96, 32) and len(namespace["images"]) == 4
    assert namespace["pipe"].transformer.peft_config  # the LoRA was loaded


def test_lora_adapters_start_equal_and_switch():
    pipe = crd.load_pipeline(crd.TINY_MODEL)
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
    pipe = crd.load_pipeline(crd.TINY_MODEL)
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


def lora_moved(tensors):
    """True if a LoRA adapter's update B A is non-zero (peft starts B at zero); tensors alternate A, B."""
    return any((b @ a).abs().sum() > 0 for a, b in zip(tensors[::2], tensors[1::2]))


def test_main_end_to_end_then_exact_resume(tmp_path):
    straight = crd.main(tiny_config(tmp_path / "a", iterations=4, eval_rewards="ink"))
    assert [m["iteration"] for m in straight] == [0, 1, 2, 3]
    run = tmp_path / "a" / "test"
    for name in ("metrics.jsonl", "checkpoint.pt", "reward_curve.png", "diagnostics.png", "samples_0000.png",
                 "eval_0004.png"):
        assert (run / name).is_file(), name
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/mean", "loss/crd", "loss/kl", "ema/eta_old", "time/sample", "time/train", "crd/corr",
            "crd/explained", "crd/corr_fresh", "ema/tau_old", "ema/tau_sampler"} <= set(logged[0])
    # before any update theta = old, so r^ = 0 ranks nothing; after one iteration it ranks fresh samples
    assert math.isnan(logged[0]["crd/corr_fresh"]) and math.isfinite(logged[1]["crd/corr_fresh"])
    assert "eval/reward" in logged[0] and "eval/reward" in logged[-1]
    assert logged[0]["eval/ink"] == pytest.approx(straight[0]["eval/ink"]) and 0 < logged[0]["eval/ink"] < 1
    assert logged[0]["ema/tau_old"] == pytest.approx(1 / (1 - logged[0]["ema/eta_old"]))

    # the same run stopped after two iterations and resumed ends bitwise identical
    crd.main(tiny_config(tmp_path / "b", iterations=2, eval_rewards="ink"))
    resumed = crd.main(tiny_config(tmp_path / "b", iterations=4, resume="auto", eval_rewards="ink"))
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3]
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "test" / "checkpoint.pt", weights_only=True)
    assert a["state"] == b["state"] == {"iteration": 4, "step": 8}
    for name in crd.ADAPTERS:
        assert all(torch.equal(x, y) for x, y in zip(a["lora"][name], b["lora"][name])), name
    assert lora_moved(a["lora"]["theta"])

    # the saved LoRA, loaded the diffusers way, reproduces theta's velocity (weights and alpha / r scale)
    pipe = crd.load_pipeline(crd.TINY_MODEL)
    params = crd.add_lora_adapters(pipe.transformer, 4, 8, crd.Config().lora_targets)
    with torch.no_grad():
        for p, t in zip(params["theta"], a["lora"]["theta"]):
            p.copy_(t)
    loaded = crd.load_pipeline(crd.TINY_MODEL)
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


def test_slow_reference_and_sampler_off_copy_theta_and_log_zero_decay(tmp_path):
    metrics = crd.main(tiny_config(tmp_path, iterations=1, slow_reference=False, decoupled_sampler=False))
    assert metrics[0]["ema/eta_old"] == metrics[0]["ema/eta_sampler"] == 0.0
    lora = torch.load(tmp_path / "test" / "checkpoint.pt", weights_only=True)["lora"]
    assert lora_moved(lora["theta"])
    for name in ("old", "sampler"):
        assert all(torch.equal(a, b) for a, b in zip(lora[name], lora["theta"])), name


def test_resume_refuses_a_changed_algorithm(tmp_path):
    crd.main(tiny_config(tmp_path, iterations=1))
    with pytest.raises(ValueError, match="beta: 1.0 -> 0.5"):
        crd.main(tiny_config(tmp_path, iterations=2, resume="auto", beta=0.5))


def test_checkpoint_write_killed_midway_leaves_previous_checkpoint(tmp_path, monkeypatch):
    params = {"theta": [torch.ones(2)], "old": [torch.zeros(2)], "sampler": [torch.zeros(2)]}
    optimizer = torch.optim.AdamW(params["theta"])
    path, cfg = str(tmp_path / "checkpoint.pt"), crd.Config()
    plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 3, "step": 6})

    def dying_save(obj, file):  # writes half a file, then the process "dies"
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    params["theta"][0].fill_(5.0)
    with pytest.raises(KeyboardInterrupt):
        plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 4, "step": 8})
    monkeypatch.undo()
    assert plumbing.load_checkpoint(path, cfg, params, optimizer) == {"iteration": 3, "step": 6}
    assert params["theta"][0].tolist() == [1.0, 1.0]


def test_bad_inputs_fail_before_loading_with_a_clear_message(tmp_path):
    base = crd.Config()
    cases = [
        (dict(prompts=str(tmp_path / "missing.txt")), crd.InputError, "does not exist"),
        (dict(model=str(tmp_path)), crd.InputError, "no model_index.json"),
        (dict(learning_rate=-1.0), crd.InputError, "--learning-rate -1.0 must be > 0"),
        (dict(iterations=0), crd.InputError, "--iterations 0 must be > 0"),
        (dict(adam_beta2=1.0), crd.InputError, r"--adam-beta2 1.0 must be in \[0, 1\)"),
        (dict(eval_rewards="ppocr,nope"), crd.InputError, "unknown reward 'nope'"),
        (dict(timestep_range=0.5, train_timesteps=6), ValueError, "train-timesteps 6"),
        (dict(centering="global"), ValueError, "choose one of prompt, batch"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            plumbing.check_inputs(dataclasses.replace(base, **overrides))
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        plumbing.check_config(base, world_size=3)
    with pytest.raises(ValueError, match="no prompt file: pass --prompts"):  # SD3.5-M ships no training prompts
        plumbing.check_inputs(crd.sd35m_ocr())
    assert plumbing.check_inputs(crd.sd35m_ocr(), training=False)[1][0].count('"') == 2  # --eval needs none
    plumbing.check_model("stabilityai/stable-diffusion-3.5-medium")  # a hub id is not checked as a folder
    with pytest.raises(crd.InputError, match="no such checkpoint"):
        crd.main(dataclasses.replace(base, resume=str(tmp_path / "nope.pt"), output_dir=str(tmp_path)))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(os.path.dirname(crd.__file__), "crd.py"), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_command_line_input_errors_print_one_line_and_no_traceback(tmp_path):
    """Each mistake a user can make on the command line exits 2 with a line naming it, before any model loads."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes('"caf\xe9"\n'.encode("latin-1"))
    corrupt = tmp_path / "corrupt_lora"
    corrupt.mkdir()
    (corrupt / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    cases = [
        (["--height", "33"], "--height 33 is not a multiple of 8"),
        (["--width", "100", "--model", crd.SHAPES_MODEL], "--width 100 is not a multiple of 8"),
        (["--output-dir", str(in_the_way / "runs")], "a_file' is a file"),
        (["--eval", "--lora", str(corrupt)], "pytorch_lora_weights.safetensors is not a readable safetensors file"),
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "torch finds no CUDA device here")]),
        (["--device", "tpu9"], "--device 'tpu9'"),
        (["--preset", "sd35m_ocr"], "Flow-GRPO's dataset/ocr/train.txt"),
        (["--resume", str(garbage)], "garbage.pt: not a readable CRD checkpoint"),
        (["--eval", "--lora", str(tmp_path / "no_such_dir")], "no pytorch_lora_weights.safetensors"),
        (["--prompts", str(latin1)], "latin1.txt' is not UTF-8"),
        (["--learning-rate", "-1"], "--learning-rate -1.0 must be > 0"),
        (["--iterations", "0"], "--iterations 0 must be > 0"),
        (["--model", str(tmp_path)], "no model_index.json"),
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--prompts", str(tmp_path / "missing.txt")], "missing.txt' does not exist"),
        (["--group-size", "1"], "--group-size 1: centring within a prompt needs K >= 2"),
        (["--centering", "global"], "--centering 'global': choose one of prompt, batch"),
        (["--reward-options", "ocr.nope=1"], "ocr takes"),
    ]
    for args, message in cases:
        out = run_cli("--output-dir", str(tmp_path / "runs"), *args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert message in out.stderr and "Traceback" not in out.stderr + out.stdout, (args, out.stderr[-2000:])
    offline = run_cli("--eval", "--preset", "sd35m_ocr", "--eval-rewards", "", "--output-dir", str(tmp_path / "runs"),
                      env={"HF_HUB_OFFLINE": "1"})  # a hub id with no network and no cache
    assert offline.returncode == 2 and "cannot load --model 'stabilityai/stable-diffusion-3.5-medium'" in \
        offline.stderr and "HF_HUB_OFFLINE" in offline.stderr and "Traceback" not in offline.stderr
    debug = run_cli("--iterations", "0", env={"CRD_DEBUG": "1"})  # the traceback is there when asked for
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputError" in debug.stderr


def test_log_to_tensorboard_writes_the_metrics_keys_and_the_held_out_grid(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = crd.main(tiny_config(tmp_path, iterations=1, log_to="tensorboard"))
    events = EventAccumulator(str(tmp_path / "test" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"reward/mean", "loss/crd", "eval/reward", "crd/corr"} <= set(events.Tags()["scalars"])
    assert events.Scalars("reward/mean")[0].value == pytest.approx(metrics[0]["reward/mean"])
    assert "eval/grid" in events.Tags()["images"]


def test_held_out_evaluation_gives_prompt_i_the_seed_seed_plus_i_whatever_the_batching():
    """plumbing.evaluate: prompt i is drawn with seed `seed + i` in any batch size (every model compared sees the
    same noise), rewards come back in prompt order, the unseen metric scores the very images the reward scored,
    and GenEval tags give per-tag means and their mean."""
    calls = []

    def generate(prompts, seeds):  # an image whose grey level is its seed: the reward can read the seed back
        calls.append(list(seeds))
        return [Image.new("RGB", (4, 4), (s, s, s)) for s in seeds]

    def grey(images, prompts):
        return torch.tensor([image.getpixel((0, 0))[0] / 255 for image in images]), {}

    prompts = [json.dumps({"prompt": f"prompt {i}", "tag": "a" if i < 3 else "b"}) for i in range(5)]
    results = [plumbing.evaluate(generate, grey, prompts, batch_size=size, seed=100, unseen={"grey": grey})
               for size in (2, 5)]
    assert calls == [[100, 101], [102, 103], [104], [100, 101, 102, 103, 104]]
    for result in results:
        assert result["rewards"].tolist() == pytest.approx([s / 255 for s in range(100, 105)])
        assert result["unseen"]["grey"] == pytest.approx(result["reward"]) and result["n"] == 5
        assert result["per_tag"]["a"]["reward"] == pytest.approx(101 / 255)
        assert result["per_tag"]["b"]["reward"] == pytest.approx(103.5 / 255)
        assert result["tag_mean"]["reward"] == pytest.approx((101 + 103.5) / 2 / 255)


def test_plumbing_imports_nothing_from_crd():
    """`python crd.py` runs crd.py as __main__: a plumbing.py that imported crd would load a second copy of it."""
    import ast

    tree = ast.parse(open(plumbing.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "crd" not in imported and "reward" in imported


def test_checkpoint_with_pickled_code_is_refused_and_a_real_one_loads_weights_only(tmp_path):
    params = {"theta": [torch.ones(2)], "old": [torch.zeros(2)], "sampler": [torch.zeros(2)]}
    optimizer = torch.optim.AdamW(params["theta"])
    params["theta"][0].grad = torch.ones(2)
    optimizer.step()  # a real AdamW state: tensors, numbers, tuples
    cfg, path = crd.Config(), str(tmp_path / "checkpoint.pt")
    plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 1, "step": 1})
    assert plumbing.load_checkpoint(path, cfg, params, optimizer) == {"iteration": 1, "step": 1}
    evil = str(tmp_path / "evil.pt")
    torch.save({"config": {}, "state": {}, "optimizer": {}, "lora": {}, "payload": torch.nn.Linear(1, 1)}, evil)
    with pytest.raises(crd.InputError, match="evil.pt: not a readable CRD checkpoint"):
        plumbing.load_checkpoint(evil, cfg, params, optimizer)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(crd.InputError, match="foreign.pt: not a CRD checkpoint"):
        plumbing.load_checkpoint(foreign, cfg, params, optimizer)


def test_ocr_reward_scores_a_failing_image_zero_and_raises_when_all_fail():
    from tools.pretrain_tiny import font_path, render
    from PIL import ImageFont

    fn = reward.make_reward("ocr")
    good = render("word", ImageFont.truetype(font_path(), 20))
    rewards, info = fn([good, None], ['"word"', '"word"'])  # None cannot be read: counted, scored 0
    assert rewards.tolist() == [1.0, 0.0] and info["ocr/failures"] == 1
    with pytest.raises(RuntimeError, match="OCR failed on all 2 images"):
        fn([None, None], ['"a"', '"b"'])


def test_sigint_stops_after_the_iteration_with_a_checkpoint_that_resumes(tmp_path):
    import signal
    flags = ["--reward", "ink", "--run-name", "sig", "--output-dir", str(tmp_path), "--prompts-per-iteration", "2",
             "--group-size", "2", "--micro-batch-size", "2", "--train-timesteps", "1", "--num-steps", "3",
             "--eval-num-steps", "3", "--eval-count", "2", "--eval-every", "0", "--checkpoint-every", "1000",
             "--lora-rank", "4"]
    command = [sys.executable, os.path.join(os.path.dirname(__file__), "crd.py"), *flags]
    process = subprocess.Popen(command + ["--iterations", "1000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = []
    for line in process.stdout:  # wait for the first finished iteration, then press Ctrl-C
        output.append(line)
        if line.startswith("it   0 |"):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 0, "".join(output)
    assert "continue with the same command plus --resume auto" in "".join(output)
    done = torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)["state"]["iteration"]
    assert 1 <= done < 1000
    subprocess.run(command + ["--iterations", str(done + 1), "--resume", "auto"], check=True, capture_output=True)
    assert torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)["state"]["iteration"] == done + 1


RANK_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import crd

recorded, adapters = [], {}
normalize, add_adapters = crd.normalize_rewards, crd.add_lora_adapters
crd.normalize_rewards = lambda rewards, **kw: recorded.append(normalize(rewards, **kw)) or recorded[-1]
crd.add_lora_adapters = lambda *a, **kw: adapters.update(add_adapters(*a, **kw)) or adapters
crd.main(crd.Config(**json.loads(sys.argv[2])))
torch.save({"normalized": recorded, "theta": [p.detach().clone() for p in adapters["theta"]]},
           os.path.join(sys.argv[3], f"rank{os.environ.get('RANK', 'single')}.pt"))
"""


def test_torchrun_two_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cfg = dataclasses.asdict(tiny_config(tmp_path / "out", iterations=2, train_timesteps=2))
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    here, json.dumps(cfg), str(tmp_path)], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run([sys.executable, str(script), here, json.dumps(cfg | {"run_name": "single"}), str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=600)
    rank0, rank1, single = (torch.load(tmp_path / f"rank{r}.pt") for r in ("0", "1", "single"))
    assert all(torch.equal(a, b) for a, b in zip(rank0["theta"], rank1["theta"]))  # gradients were averaged
    # iteration 0: the same prompts and seeds, split over two ranks, give the same centred rewards as one process
    assert torch.allclose(rank0["normalized"][0], single["normalized"][0], atol=1e-4)
    assert torch.equal(rank0["normalized"][0], rank1["normalized"][0])


def build_sd35m_layout_pipeline(directory):
    """A tiny random pipeline with SD3.5-M's component layout: two CLIP encoders + a T5 encoder, a 16-channel VAE,
    a transformer with dual-attention blocks and RMS qk-norm, a shift-3 scheduler. Saved with save_pretrained."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config
    from transformers import T5EncoderModel

    from tools.pretrain_tiny import build_tokenizer

    torch.manual_seed(0)
    clip_tokenizer = build_tokenizer(os.path.join(directory, "clip_tokenizer"), max_length=16)
    clip_config = CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                 projection_dim=32, bos_token_id=clip_tokenizer.bos_token_id,
                                 eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id)
    words = ["<pad>", "</s>", "<unk>", '"abc"', '"xyz"', "a", "sign"]
    t5_backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t5_backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t5_tokenizer = PreTrainedTokenizerFast(tokenizer_object=t5_backend, pad_token="<pad>", eos_token="</s>",
                                           unk_token="<unk>", model_max_length=8)
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=64, d_ff=64, d_kv=16, num_layers=1, num_heads=2))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                          caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                                          dual_attention_layers=(0,), qk_norm="rms_norm"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                          latent_channels=16, norm_num_groups=8, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(clip_config), tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config), tokenizer_2=clip_tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(directory)


def test_sd35m_code_path_runs_on_a_tiny_pipeline_with_its_layout(tmp_path):
    model = tmp_path / "tiny-sd35m-layout"
    build_sd35m_layout_pipeline(str(model))
    pipe = crd.load_pipeline(str(model))  # reloads offline, all three text encoders present
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


def test_nonfinite_loss_stops_with_iteration_and_step_or_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(crd, "crd_loss", lambda *args, **kwargs: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite loss nan at iteration 0, optimizer step 0"):
        crd.main(tiny_config(tmp_path / "stop", iterations=1))
    metrics = crd.main(tiny_config(tmp_path / "skip", iterations=1, skip_nonfinite=True))
    assert metrics[0]["train/skipped"] == 2  # both passes skipped; the optimizer steps found no gradient


# ---------------------------------------------------------------------------------------------------------------
# GenEval rules (reward.py): hand-built detections with known answers, no models. The benchmark's binary verdict
# (djghosh13/geneval evaluation/evaluate_images.py), the reward-server's partial score (yifan123/reward-server
# reward_server/gen_eval.py) with and without its position bug, the detection filter, the relation geometry, the
# colour classifier's input crop, and metadata validation (all 553 shipped lines).
# ---------------------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
GENEVAL_DIR = os.path.join(HERE, "data", "geneval")
SIZE = 64  # images are SIZE x SIZE pixels


def det(label, box, score=0.95, colour=None):
    """A detection whose mask is its box; `colour` is what the fake colour classifier will say."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    x0, y0, x1, y1 = (min(max(int(round(v)), 0), SIZE) for v in box)  # the part of the box inside the image
    mask[y0:y1, x0:x1] = True
    detection = Detection(label=label, score=score, mask=mask, box=tuple(float(v) for v in box))
    detection.colour = colour  # read by colour_of below; not a field of Detection
    return detection


def colour_of(detection):
    return detection.colour


def no_colour(detection):
    raise AssertionError("colour_of must not be called when no clause names a colour")


# ---------------------------------------------------------------------------------------------------------------
# The six tags
# ---------------------------------------------------------------------------------------------------------------
def test_single_object_pass_and_fail():
    meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    ok = geneval_check([det("bench", (5, 5, 30, 30))], meta, no_colour)
    assert (ok.correct, ok.score, ok.strict_correct) == (True, 1.0, True)
    assert ok.reason == "all requirements met"
    missing = geneval_check([det("dog", (5, 5, 30, 30))], meta, no_colour)
    assert (missing.correct, missing.score, missing.strict_correct) == (False, 0.0, False)
    assert "bench" in missing.reason


def test_single_object_extra_copies_pass_benchmark_but_cost_partial_score():
    meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    two = geneval_check([det("bench", (0, 0, 10, 10)), det("bench", (30, 30, 40, 40), 0.8)], meta, no_colour)
    assert two.correct and not two.strict_correct
    assert two.score == pytest.approx(0.0)  # 1 - |1 - 2| / 1
    three = [det("bench", (0, 0, 10, 10)), det("bench", (20, 20, 30, 30)), det("bench", (40, 40, 50, 50))]
    assert geneval_check(three, meta, no_colour).score == pytest.approx(-1.0)  # 1 - |1 - 3| / 1: not floored
    assert geneval_check(three, meta, no_colour, clip_count_terms=True).score == 0.0


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}]}
    both = geneval_check([det("bench", (0, 0, 20, 20)), det("sports ball", (30, 30, 40, 40))], meta, no_colour)
    assert (both.correct, both.score, both.strict_correct) == (True, 1.0, True)
    one = geneval_check([det("bench", (0, 0, 20, 20))], meta, no_colour)
    assert not one.correct and one.score == pytest.approx(0.5)  # terms (1, 0)
    assert "sports ball" in one.reason


def test_counting_needs_exact_count_via_exclude():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    clocks = [det("clock", (i * 15, 0, i * 15 + 10, 10)) for i in range(4)]
    two = geneval_check(clocks[:2], meta, no_colour)
    assert (two.correct, two.score, two.strict_correct) == (True, 1.0, True)
    three = geneval_check(clocks[:3], meta, no_colour)  # include holds, the exclude clause fires
    assert not three.correct and "fewer than 3 clock" in three.reason
    assert three.score == pytest.approx(0.5) and not three.strict_correct  # 1 - |2 - 3| / 2
    one = geneval_check(clocks[:1], meta, no_colour)
    assert not one.correct and one.score == pytest.approx(0.5)
    four = geneval_check(clocks, meta, no_colour)
    assert not four.correct and four.score == pytest.approx(0.0)  # 1 - |2 - 4| / 2


def test_counting_uses_the_090_threshold():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    confident = det("clock", (0, 0, 10, 10), 0.95)
    unsure = det("clock", (20, 0, 30, 10), 0.85)
    result = geneval_check([confident, unsure], meta, no_colour)
    assert not result.correct and result.score == pytest.approx(0.5)  # only one clock survives 0.9
    # the same detections under a non-counting tag: 0.85 > 0.3, so two clocks
    two_meta = {"tag": "two_object", "include": [{"class": "clock", "count": 2}]}
    assert geneval_check([confident, unsure], two_meta, no_colour).correct


def test_colors_match_and_mismatch():
    meta = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}]}
    blue = geneval_check([det("fire hydrant", (0, 0, 20, 40), colour="blue")], meta, colour_of)
    assert (blue.correct, blue.score, blue.strict_correct) == (True, 1.0, True)
    red = geneval_check([det("fire hydrant", (0, 0, 20, 40), colour="red")], meta, colour_of)
    assert not red.correct and not red.strict_correct
    assert red.score == pytest.approx(0.5)  # terms (count 1, colour 0)
    assert "blue" in red.reason and "1 red" in red.reason


def test_colors_benchmark_judges_only_the_best_detections():
    meta = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}]}
    best = det("fire hydrant", (0, 0, 20, 40), 0.9, colour="blue")
    worse = det("fire hydrant", (30, 0, 50, 40), 0.5, colour="red")
    result = geneval_check([worse, best], meta, colour_of)
    assert result.correct  # the top-1 hydrant is blue; the red one is not looked at
    assert result.score == pytest.approx(0.0)  # terms (1 - |1 - 2| / 1 = 0, a wrong count adds 0)
    flipped = geneval_check([det("fire hydrant", (0, 0, 20, 40), 0.9, colour="red"),
                             det("fire hydrant", (30, 0, 50, 40), 0.5, colour="blue")], meta, colour_of)
    assert not flipped.correct


def test_color_attr():
    meta = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                             {"class": "apple", "count": 1, "color": "black"}]}
    glass = det("wine glass", (0, 0, 20, 40), colour="purple")
    good = geneval_check([glass, det("apple", (30, 30, 50, 50), colour="black")], meta, colour_of)
    assert (good.correct, good.score, good.strict_correct) == (True, 1.0, True)
    bad = geneval_check([glass, det("apple", (30, 30, 50, 50), colour="red")], meta, colour_of)
    assert not bad.correct and bad.score == pytest.approx(0.75)  # terms (1, 1, 1, 0)


def test_colour_of_must_return_a_known_colour():
    meta = {"tag": "colors", "include": [{"class": "apple", "count": 1, "color": "red"}]}
    with pytest.raises(ValueError, match="colour_of returned 'crimson'"):
        geneval_check([det("apple", (0, 0, 10, 10), colour="crimson")], meta, colour_of)


POSITION_META = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                                {"class": "dog", "count": 1, "position": ["right of", 0]}]}


def test_position_tag_pass_fail_and_bug_switch():
    bear = det("teddy bear", (0, 20, 20, 40))
    right = geneval_check([bear, det("dog", (40, 20, 60, 40))], POSITION_META, no_colour)
    assert (right.correct, right.score, right.strict_correct) == (True, 1.0, True)
    left = [bear, det("dog", (-40, 20, -20, 40))]  # dog left of the bear
    fixed = geneval_check(left, POSITION_META, no_colour)
    assert not fixed.correct and "found left of" in fixed.reason
    assert fixed.score == pytest.approx(2 / 3)  # terms (1, 1, 0)
    buggy = geneval_check(left, POSITION_META, no_colour, position_bug=True)
    assert buggy.score == pytest.approx(0.75)  # terms (1, 1, 0, 1): the reward-server appends 1 after the 0
    assert not buggy.correct and not buggy.strict_correct


def test_position_bug_switch_changes_nothing_when_the_relation_holds_or_is_not_checked():
    bear = det("teddy bear", (0, 20, 20, 40))
    dog = det("dog", (40, 20, 60, 40))
    for bug in (False, True):
        assert geneval_check([bear, dog], POSITION_META, no_colour, position_bug=bug).score == 1.0
        # no dog: terms (1, 0 count, 0 for the unchecked relation)
        assert geneval_check([bear], POSITION_META, no_colour, position_bug=bug).score == pytest.approx(1 / 3)
        # no bear: terms (0, 1, 0 because the target clause failed)
        no_target = geneval_check([dog], POSITION_META, no_colour, position_bug=bug)
        assert no_target.score == pytest.approx(1 / 3)
        assert not no_target.correct and "failed its own check" in no_target.reason


def test_position_checks_every_pair_against_the_target_group():
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 2},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    bears_left = [det("teddy bear", (0, 0, 10, 10)), det("teddy bear", (0, 40, 10, 50))]
    between = [det("teddy bear", (0, 0, 10, 10)), det("teddy bear", (50, 40, 60, 50))]
    dog = det("dog", (30, 20, 40, 30))
    assert geneval_check(bears_left + [dog], meta, no_colour).correct
    assert not geneval_check(between + [dog], meta, no_colour).correct  # right of one bear, left of the other


@pytest.mark.parametrize("dog_box, relation", [
    ((40, 20, 60, 40), "right of"), ((-40, 20, -20, 40), "left of"),
    ((0, -20, 20, 0), "above"), ((0, 60, 20, 80), "below")])
def test_each_relation(dog_box, relation):
    bear = det("teddy bear", (0, 20, 20, 40))
    assert geneval_relations(dog_box, bear.box) == {relation}
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": [relation, 0]}]}
    dog = det("dog", dog_box)
    assert geneval_check([bear, dog], meta, no_colour).correct
    others = [r for r in reward.GENEVAL_RELATIONS if r != relation]
    for other in others:
        meta["include"][1]["position"] = [other, 0]
        assert not geneval_check([bear, dog], meta, no_colour).correct


def test_relation_margin_is_a_tenth_of_the_summed_box_sizes():
    # centres 1.5 px apart horizontally; margin 0.1 * (10 + 10) = 2 px swallows it: no relation, so "left of" fails
    assert geneval_relations((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    bear, dog = det("teddy bear", (1.5, 0, 11.5, 10)), det("dog", (0, 0, 10, 10))
    assert not geneval_check([bear, dog], meta, no_colour).correct
    # same centres, thinner boxes (widths 2): margin 0.4 px < 1.5 px, so A is left of B
    assert geneval_relations((4, 0, 6, 10), (5.5, 0, 7.5, 10)) == {"left of"}
    # 11 px apart, widths 10: shrunk offset 9 / 11 = 0.82 > 0.5
    assert geneval_relations((0, 0, 10, 10), (11, 0, 21, 10)) == {"left of"}
    # shrunk / |offset| <= 0.5: offset 3, margin 2, 1 / 3 < 0.5 -> nothing
    assert geneval_relations((0, 0, 10, 10), (3, 0, 13, 10)) == set()
    assert geneval_relations((0, 0, 10, 10), (3, 0, 13, 10), margin=0.0) == {"left of"}


def test_diagonal_offset_gives_two_relations():
    # offset (-10, -10), sizes 2: shrunk (-9.6, -9.6) / 14.14 = -0.68 on both axes
    assert geneval_relations((0, 0, 2, 2), (10, 10, 12, 12)) == {"left of", "above"}


# ---------------------------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------------------------
def test_filter_threshold_is_strictly_above_030():
    at = det("cat", (0, 0, 10, 10), float(np.float32(0.3)))  # a float32 detector score of exactly 0.3
    above = det("cat", (20, 0, 30, 10), 0.31)
    below = det("dog", (0, 20, 10, 30), 0.29)
    kept = geneval_filter([at, above, below], "single_object")
    assert kept == {"cat": [above]}


def test_filter_counting_threshold_is_090():
    scores = [0.95, 0.91, float(np.float32(0.9)), 0.89, 0.5]
    dets = [det("cup", (i * 10, 0, i * 10 + 5, 5), s) for i, s in enumerate(scores)]
    assert [d.score for d in geneval_filter(dets, "counting")["cup"]] == [0.95, 0.91]
    assert len(geneval_filter(dets, "two_object")["cup"]) == 5


def test_filter_caps_16_per_class_best_first_and_keeps_overlaps():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.4, 1.0, size=20).tolist()
    cups = [det("cup", (0, 0, 10, 10), s) for s in scores]  # all the same box: the benchmark keeps overlaps
    books = [det("book", (0, 0, 10, 10), 0.5)]
    kept = geneval_filter(cups + books, "colors")
    assert [d.score for d in kept["cup"]] == sorted(scores, reverse=True)[:16]
    assert kept["book"] == books
    # the optional box suppression (off by default) drops same-class boxes with IoU >= max_overlap
    assert len(geneval_filter(cups, "colors", max_overlap=0.5)["cup"]) == 1


def test_filter_is_idempotent_and_check_agrees_on_filtered_input():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    dets = [det("clock", (i * 3, 0, i * 3 + 10, 10), 0.8 + 0.01 * i) for i in range(20)]
    once = geneval_filter(dets, "counting")
    flat = [d for group in once.values() for d in group]
    assert geneval_filter(flat, "counting") == once
    assert geneval_check(dets, meta, no_colour) == geneval_check(flat, meta, no_colour)


def test_filter_rejects_unknown_label_and_tag():
    with pytest.raises(ValueError, match="is not one of the object names"):
        geneval_filter([det("mouse", (0, 0, 5, 5))], "single_object")
    with pytest.raises(ValueError, match="unknown GenEval tag"):
        geneval_filter([], "spatial")


# ---------------------------------------------------------------------------------------------------------------
# Colour classifier input
# ---------------------------------------------------------------------------------------------------------------
def test_colour_crop_size_and_grey_background():
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    mask = np.zeros((30, 40), dtype=bool)
    mask[10:20, 5:15] = True
    detection = Detection("apple", 0.9, mask, (2.0, 8.0, 20.0, 24.0))
    crop = reward.colour_crop(image, detection)
    assert crop.mode == "RGB" and crop.size == (18, 16)
    pixels = np.asarray(crop)
    inside = pixels[2:12, 3:13]  # mask rows 10..19, cols 5..14 shifted by the box corner (2, 8)
    assert (inside == (200, 10, 10)).all()
    outside = np.ones(pixels.shape[:2], dtype=bool)
    outside[2:12, 3:13] = False
    assert (pixels[outside] == (153, 153, 153)).all()
    # fractional corners round as PIL's crop does; no mask keeps the image
    assert reward.colour_crop(image, Detection("apple", 0.9, None, (0.4, 0.6, 10.2, 9.7))).size == (10, 9)
    assert (np.asarray(reward.colour_crop(image, Detection("apple", 0.9, None, (0, 0, 5, 5)))) == (200, 10, 10)).all()


def test_colour_crop_rejects_a_mask_of_the_wrong_shape():
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match="mask shape"):
        reward.colour_crop(image, Detection("apple", 0.9, np.ones((40, 30), dtype=bool), (0, 0, 5, 5)))


def test_colour_constants():
    assert reward.GENEVAL_COLOURS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                                      "black", "white")
    prompts = [t.format(colour="blue", object="fire hydrant") for t in reward.GENEVAL_COLOUR_TEMPLATES]
    assert prompts == ["a photo of a blue fire hydrant", "a photo of a blue-colored fire hydrant",
                       "a photo of a blue object"]


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, message", [
    ({"tag": "spatial", "include": [{"class": "dog", "count": 1}]}, "unknown GenEval tag"),
    ({"tag": "single_object", "include": [{"class": "puppy", "count": 1}]}, "unknown class name 'puppy'"),
    ({"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "crimson"}]}, "unknown colour 'crimson'"),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 0}]}, "'count' must be an int >= 1"),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1.0}]}, "'count' must be an int >= 1"),
    ({"tag": "single_object", "include": []}, "non-empty 'include'"),
    ({"tag": "single_object"}, "non-empty 'include'"),
    ({"tag": "colors", "include": [{"class": "dog", "count": 1, "colour": "red"}]}, "unknown keys"),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                     "position": ["next to", 0]}]},
     "unknown relation"),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                     "position": ["above", 1]}]},
     "earlier include clause"),
    ({"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dogs", "count": 3}]},
     "exclude\\[0\\]: unknown class name"),
    ("not a dict", "must be a dict"),
])
def test_malformed_metadata_raises(meta, message):
    with pytest.raises(ValueError, match=message):
        reward.validate_geneval_metadata(meta)
    with pytest.raises(ValueError, match=message):
        geneval_check([], meta, no_colour)


def test_every_shipped_metadata_line_validates():
    with open(os.path.join(GENEVAL_DIR, "evaluation_metadata.jsonl")) as file:
        lines = file.read().splitlines()
    assert len(lines) == 553
    tags = []
    for line in lines:
        meta = json.loads(line)
        assert reward.validate_geneval_metadata(meta) is meta
        tags.append(meta["tag"])
    assert {tag: tags.count(tag) for tag in set(tags)} == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def test_object_names_match_the_shipped_list():
    with open(os.path.join(GENEVAL_DIR, "object_names.txt")) as file:
        assert tuple(file.read().splitlines()) == reward.GENEVAL_OBJECTS


# ---------------------------------------------------------------------------------------------------------------
# The shapes world (tools/shapes_world.py) and its detector (reward.shape_detections): rendered scenes of known
# content must be found, and fed to the same GenEval rules, to the expected verdicts
# ---------------------------------------------------------------------------------------------------------------
def shapes_scene(*objects):
    """A scene from (shape, colour, x0, y0, side) tuples, in tools.shapes_world's format."""
    return [(shape, colour, (x0, y0, x0 + side - 1, y0 + side - 1)) for shape, colour, x0, y0, side in objects]


# the trained reward's detector and the unseen metric's, built independently: both must pass every test below
DETECTORS = {"regions": (reward.shape_detections, reward.shape_colour),
             "polygons": (reward.polygon_detections, reward.polygon_colour)}


def shapes_geneval(scene, metadata, detector="regions"):
    from tools.shapes_world import render

    detect, colour_of = DETECTORS[detector]
    image = render(scene)
    return reward.geneval_check(detect(image), metadata, lambda d: colour_of(image, d), objects=reward.SHAPES)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("shape", reward.SHAPES)
@pytest.mark.parametrize("side", [12, 16, 20, 26])
def test_shape_detector_names_every_shape_and_colour(shape, side, detector):
    from tools.shapes_world import render

    detect, colour_of = DETECTORS[detector]
    for colour in reward.SHAPE_PALETTE:
        image = render(shapes_scene((shape, colour, 20, 10, side)))
        (found,) = detect(image)
        assert (found.label, colour_of(image, found)) == (shape, colour)
        assert found.score > reward.GENEVAL_COUNTING_THRESHOLD  # clean renders pass even the counting threshold
        assert found.box == (20.0, 10.0, 20.0 + side - 1, 10.0 + side - 1)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shape_detector_counts_separate_shapes_and_merges_touching_ones(count, detector):
    corners = [(2, 2), (40, 2), (2, 40), (40, 40)]
    scene = shapes_scene(*[("circle", "blue", x, y, 18) for x, y in corners[:count]])
    metadata = {"tag": "counting", "include": [{"class": "circle", "count": count}],
                "exclude": [{"class": "circle", "count": count + 1}]}
    assert shapes_geneval(scene, metadata, detector).correct
    if count > 1:  # one circle fewer asked for: the exclude clause fires
        fewer = {"tag": "counting", "include": [{"class": "circle", "count": count - 1}],
                 "exclude": [{"class": "circle", "count": count}]}
        assert not shapes_geneval(scene, fewer, detector).correct
    from tools.shapes_world import render

    touching = render(shapes_scene(("square", "red", 10, 10, 16), ("square", "red", 26, 10, 16)))
    assert len(DETECTORS[detector][0](touching)) == 1  # one region, as any detector would see it
    assert DETECTORS[detector][0](render([])) == []  # a blank image holds no object


@pytest.mark.parametrize("detector", DETECTORS)
def test_shape_detector_positions_follow_the_geneval_relations(detector):
    left_of = {"tag": "position", "include": [{"class": "square", "count": 1},
                                              {"class": "triangle", "count": 1, "position": ["left of", 0]}]}
    assert shapes_geneval(shapes_scene(("triangle", "green", 4, 24, 16), ("square", "red", 40, 24, 16)),
                          left_of, detector).correct
    swapped = shapes_geneval(shapes_scene(("triangle", "green", 40, 24, 16), ("square", "red", 4, 24, 16)), left_of,
                             detector)
    assert not swapped.correct and "found right of" in swapped.reason
    above = dict(left_of, include=[left_of["include"][0], {"class": "triangle", "count": 1,
                                                           "position": ["above", 0]}])
    assert shapes_geneval(shapes_scene(("triangle", "green", 24, 2, 16), ("square", "red", 24, 40, 16)),
                          above, detector).correct


@pytest.mark.parametrize("detector", DETECTORS)
def test_shape_detector_colour_binding_and_partial_credit(detector):
    metadata = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                                 {"class": "cross", "count": 1, "color": "blue"}]}
    right = shapes_geneval(shapes_scene(("circle", "red", 4, 4, 18), ("cross", "blue", 36, 36, 18)), metadata,
                           detector)
    assert right.correct and right.score == 1.0
    swapped = shapes_geneval(shapes_scene(("circle", "blue", 4, 4, 18), ("cross", "red", 36, 36, 18)), metadata,
                             detector)
    assert not swapped.correct and swapped.score == 0.5  # both counts right (1, 1), both colours wrong (0, 0)
    blank = shapes_geneval([], metadata, detector)
    assert not blank.correct and blank.score == 0.0


def test_shape_features_are_the_means_of_the_worlds_renders():
    import random

    from tools.shapes_world import render

    rng, measured = random.Random(0), {name: [] for name in reward.SHAPES}
    for shape in reward.SHAPES:
        for _ in range(30):
            side = rng.randint(12, 20)
            image = render(shapes_scene((shape, rng.choice(list(reward.SHAPE_PALETTE)), 10, 10, side)))
            measured[shape].append(reward.shape_features(reward.shape_detections(image)[0].mask))
    for shape, values in measured.items():
        np.testing.assert_allclose(np.mean(values, axis=0), reward.SHAPE_FEATURES[shape], atol=0.02)


def test_shapes_world_scenes_satisfy_their_prompts_and_lists_share_none():
    import random

    from tools.shapes_world import LINES, TAGS, make_prompt_lists, render, scene_for

    lists = make_prompt_lists(0)
    texts = {name: {m["prompt"] for m in lines} for name, lines in lists.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["heldout"]
    assert not texts["val"] & texts["heldout"]
    for name, lines in lists.items():
        assert len(lines) == LINES[name]
        shares = [sum(m["tag"] == tag for m in lines) for tag in TAGS]
        assert max(shares) - min(shares) <= 1, (name, shares)  # the six tags in equal shares
    rng = random.Random(0)
    sample = lists["heldout"][::8] + lists["train"][::60]  # every tag of both lists
    images = [render(scene_for(m, rng)) for m in sample]
    for name in ("geneval_shapes", "geneval_shapes_poly"):  # the trained reward and the unseen metric
        rewards, info = reward.make_reward(name)(images, [json.dumps(m) for m in sample])
        assert rewards.tolist() == [1.0] * len(sample), name
        assert info["geneval/correct"].tolist() == [1.0] * len(sample), name


def test_shapes_reward_checks_prompts_against_the_shapes_vocabulary():
    reward.check_prompts("geneval_shapes", ['{"tag": "single_object", "include": [{"class": "cross", "count": 1}]}'])
    with pytest.raises(ValueError, match="prompt 1 cannot be scored by the geneval_shapes reward.*'dog'"):
        reward.check_prompts("geneval_shapes", ['{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}'])
    with pytest.raises(ValueError, match="'cross'"):  # and the COCO reward refuses the shapes
        reward.check_prompts("geneval", ['{"tag": "single_object", "include": [{"class": "cross", "count": 1}]}'])


# ---------------------------------------------------------------------------------------------------------------
# Model-backed rewards (reward.py: GenEval's Mask2Former + CLIP colour, PickScore, CLIPScore) on tiny RANDOM models
# built from configs, saved with save_pretrained and loaded back through the factories' from_pretrained path.
# ---------------------------------------------------------------------------------------------------------------
CHARS = string.ascii_lowercase + string.digits + "\"'.,!?-&:{}[]_"
CLIP_MAX_LENGTH = 64


def build_tokenizer(directory):
    """A character-level CLIPTokenizer (every character a token, no BPE merges), saved to `directory`."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                         model_max_length=CLIP_MAX_LENGTH, pad_token="<|endoftext|>")


def build_clip(directory, seed=0):
    """A tiny random CLIPModel + CLIPProcessor (32x32 images), saved to `directory`; returns (model, processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def build_detector(directory, seed=0, num_queries=1, boost_class=None):
    """A tiny random COCO-instance Mask2Former (Swin backbone, 80 classes) + image processor, saved to `directory`.

    boost_class: a class index whose logit is raised by 30 for every query (so the detector is sure of it).
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_mask2former import Mask2FormerImageProcessor

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=80, feature_size=32, mask_feature_size=32,
                               hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, dim_feedforward=32, num_queries=num_queries)
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if boost_class is not None:
        with torch.no_grad():
            model.class_predictor.bias[boost_class] += 30.0
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    build_clip(directory)
    return directory


def image(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def outputs(class_logits, mask_logits):
    return SimpleNamespace(class_queries_logits=torch.as_tensor(class_logits, dtype=torch.float32)[None],
                           masks_queries_logits=torch.as_tensor(mask_logits, dtype=torch.float32)[None])


# ---------------------------------------------------------------------------------------------------------------
# Mask2Former post-processing
# ---------------------------------------------------------------------------------------------------------------
def test_instances_scores_boxes_masks_on_known_outputs():
    # Query 0: class 16 ("dog") certain; its mask logit is +2 on a 2x3 block of a 4x4 grid, -2 elsewhere. Query 1:
    # the "no object" class wins outright, so no real class gets a real probability.
    classes = torch.full((2, 81), -20.0)
    classes[0, 16] = 10.0
    classes[1, 80] = 10.0
    masks = torch.full((2, 4, 4), -2.0)
    masks[0, 1:3, 0:3] = 2.0  # rows 1-2, columns 0-2
    found = mask2former_instances(outputs(classes, masks), (4, 4), GENEVAL_OBJECTS, top_k=3)
    assert len(found) == 3
    best = found[0]
    assert best.label == "dog"
    expected_mask = np.zeros((4, 4), dtype=bool)
    expected_mask[1:3, 0:3] = True
    np.testing.assert_array_equal(best.mask, expected_mask)
    assert best.box == (0.0, 1.0, 3.0, 3.0)  # (first column, first row, last column + 1, last row + 1)
    prob = torch.softmax(classes[0], dim=0)[16].item()
    assert best.score == pytest.approx(prob * (1 / (1 + math.exp(-2.0))), rel=1e-5)
    # The no-object class is dropped: every label is one of the 80, and query 1 contributes only ~0 scores.
    assert all(d.label in GENEVAL_OBJECTS for d in found)
    assert all(d.score < 1e-6 for d in found[1:])


def test_instances_drop_no_object_class_before_top_k():
    # The no-object class (last) has the highest logit; it must never be picked, and the softmax includes it.
    classes = torch.tensor([[0.0] * 80 + [5.0]])
    classes[0, 3] = 4.0
    masks = torch.ones((1, 2, 2))
    found = mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=1)
    assert [d.label for d in found] == ["motorcycle"]
    expected = torch.softmax(classes[0], dim=0)[3].item() * torch.sigmoid(torch.tensor(1.0)).item()
    assert found[0].score == pytest.approx(expected, rel=1e-5)


def test_instances_top_k_over_queries_and_classes():
    # Probabilities of (query, class): (1, 5) ~0.73 > (0, 2) ~0.5 (query 0 shares with "no object") > (1, 7)
    # ~0.27 > everything else (~1e-8); top_k=3 picks those, in that order.
    classes = torch.full((2, 81), -10.0)
    classes[0, 2], classes[0, 80] = 8.0, 8.0
    classes[1, 5], classes[1, 7] = 9.0, 8.0
    masks = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 1.0)])
    found = mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=3)
    assert [d.label for d in found] == [GENEVAL_OBJECTS[5], GENEVAL_OBJECTS[2], GENEVAL_OBJECTS[7]]
    # each takes its own query's mask: query 1 (logit 1) for classes 5 and 7, query 0 (logit 3) for class 2
    probs = torch.softmax(classes, dim=1)
    sig = torch.sigmoid(torch.tensor([3.0, 1.0]))
    assert [d.score for d in found] == pytest.approx(
        [(probs[1, 5] * sig[1]).item(), (probs[0, 2] * sig[0]).item(), (probs[1, 7] * sig[1]).item()], rel=1e-5)
    assert len(mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=1000)) == 2 * 80


def test_instances_threshold_at_logit_zero_and_empty_mask():
    classes = torch.full((2, 81), -10.0)
    classes[0, 0], classes[1, 1] = 10.0, 9.0
    # query 0: one pixel exactly 0 (not in the mask), one at 0.01 (in it); query 1: all negative -> empty mask
    masks = torch.tensor([[[0.0, 0.01], [-1.0, -1.0]], [[-0.01, -3.0], [-1.0, -2.0]]])
    found = mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=2)
    np.testing.assert_array_equal(found[0].mask, [[False, True], [False, False]])
    assert found[0].box == (1.0, 0.0, 2.0, 1.0)
    assert found[0].score == pytest.approx(torch.softmax(classes[0], 0)[0].item() * torch.sigmoid(
        torch.tensor(0.01)).item(), rel=1e-5)
    assert not found[1].mask.any()
    assert found[1].score == 0.0 and found[1].box == (0.0, 0.0, 0.0, 0.0)


def test_instances_upsample_bilinear_to_image_size():
    # A 2x2 mask logit map upsampled to an 8-wide, 4-high image (image_size is PIL's (W, H)).
    classes = torch.full((1, 81), -10.0)
    classes[0, 0] = 10.0
    masks = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]])  # right column positive
    found = mask2former_instances(outputs(classes, masks), (8, 4), GENEVAL_OBJECTS, top_k=1)
    detection = found[0]
    assert detection.mask.shape == (4, 8)
    expected_logits = torch.nn.functional.interpolate(masks[None], size=(4, 8), mode="bilinear",
                                                      align_corners=False)[0, 0]
    np.testing.assert_array_equal(detection.mask, (expected_logits > 0).numpy())
    assert detection.mask[:, 4:].all() and not detection.mask[:, :4].any()
    assert detection.box == (4.0, 0.0, 8.0, 4.0)
    inside = torch.sigmoid(expected_logits[expected_logits > 0]).mean().item()
    assert detection.score == pytest.approx(torch.softmax(classes[0], 0)[0].item() * inside, rel=1e-5)


def test_instances_pick_batch_index():
    classes = torch.full((2, 1, 81), -10.0)
    classes[0, 0, 1], classes[1, 0, 2] = 10.0, 10.0
    batch = SimpleNamespace(class_queries_logits=classes, masks_queries_logits=torch.ones((2, 1, 2, 2)))
    assert mask2former_instances(batch, (2, 2), GENEVAL_OBJECTS, top_k=1, index=1)[0].label == GENEVAL_OBJECTS[2]


def test_labels_map_checkpoint_names_and_placeholders():
    coco = {i: name for i, name in enumerate(GENEVAL_OBJECTS)}
    coco.update({64: "mouse", 65: "remote", 66: "keyboard"})
    assert mask2former_labels(coco) == GENEVAL_OBJECTS
    assert mask2former_labels({str(i): f"LABEL_{i}" for i in range(80)}) == GENEVAL_OBJECTS
    swapped = dict(coco)
    swapped[0], swapped[1] = coco[1], coco[0]
    assert mask2former_labels(swapped)[:2] == ("bicycle", "person")
    with pytest.raises(ValueError, match="80"):
        mask2former_labels({i: GENEVAL_OBJECTS[i] for i in range(79)})
    with pytest.raises(ValueError, match="wall"):
        mask2former_labels({**coco, 5: "wall"})


# ---------------------------------------------------------------------------------------------------------------
# CLIP colour classifier
# ---------------------------------------------------------------------------------------------------------------
def test_colour_classifier_returns_a_colour_of_the_crop(clip_dir, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    colour_of = clip_colour_classifier(model, processor, "cpu")
    picture = Image.new("RGB", (40, 30), (200, 10, 10))
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 10:20] = True
    detection = Detection(label="dog", score=0.9, mask=mask, box=(8, 3, 24, 17))

    seen = []
    real_call = type(processor).__call__

    def spy(self, *args, **kwargs):
        if kwargs.get("images") is not None:
            seen.extend(kwargs["images"])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", spy)
    colour = colour_of(picture, detection)
    assert colour in GENEVAL_COLOURS
    # The crop reaches CLIP: the box's size, object pixels red, the rest #999 grey.
    assert len(seen) == 1 and seen[0].size == (16, 14)
    crop = np.asarray(seen[0])
    assert tuple(crop[0, 0]) == GENEVAL_CROP_BACKGROUND
    assert tuple(crop[2 + 5, 2 + 5]) == (200, 10, 10)

    # The pick is the argmax of image . (mean of the 3 templates' normalised text embeddings, re-normalised).
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        pixels = real_call(processor, images=[reward.colour_crop(picture, detection)], return_tensors="pt")
        image_emb = normalize(model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output, dim=-1)
        scores = []
        for name in GENEVAL_COLOURS:
            texts = [t.format(colour=name, object="dog") for t in reward.GENEVAL_COLOUR_TEMPLATES]
            tokens = real_call(processor, text=texts, return_tensors="pt", padding=True)
            text_emb = normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            scores.append((image_emb[0] @ normalize(text_emb.mean(0), dim=-1)).item())
    assert colour == GENEVAL_COLOURS[int(np.argmax(scores))]


def test_colour_classifier_averages_normalised_templates_then_renormalises(monkeypatch):
    # Hand-made unit embeddings in 2-D, image embedding (1, 0). Right rule (mean of the 3 templates, re-normalised,
    # argmax of the dot product): orange (0.913). Without re-normalising: red (0.8); first template only or the
    # best template: yellow (0.95).
    vectors = {"red": [(0.8, 0.6)] * 3, "orange": [(0.6, 0.8), (0.6, -0.8), (0.6, 0.8)],
               "yellow": [(0.95, 0.31225), (-1.0, 0.0), (-1.0, 0.0)]}
    table = {template.format(colour=colour, object="kite"): vectors.get(colour, [(0.0, 1.0)] * 3)[i]
             for colour in GENEVAL_COLOURS for i, template in enumerate(reward.GENEVAL_COLOUR_TEMPLATES)}
    monkeypatch.setattr(reward, "clip_text_embeddings",
                        lambda model, processor, texts, device=None: torch.tensor([table[t] for t in texts]))
    monkeypatch.setattr(reward, "clip_image_embeddings",
                        lambda model, processor, images, device=None: torch.tensor([[1.0, 0.0]] * len(images)))
    colour_of = clip_colour_classifier(None, None, "cpu")
    detection = Detection(label="kite", score=0.9, mask=None, box=(0, 0, 4, 4))
    assert colour_of(image(0), detection) == "orange"
    assert colour_of.colours(image(0), [detection, detection]) == ["orange", "orange"]


def test_colour_classifier_caches_text_embeddings_per_object(clip_dir, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    calls = []
    real = reward.clip_text_embeddings
    monkeypatch.setattr(reward, "clip_text_embeddings", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    colour_of = clip_colour_classifier(model, processor, "cpu")
    detection = Detection(label="cat", score=0.9, mask=None, box=(0, 0, 10, 10))
    first = colour_of(image(1), detection)
    assert colour_of(image(1), detection) == first
    colour_of(image(2), Detection(label="cup", score=0.9, mask=None, box=(0, 0, 10, 10)))
    assert len(calls) == 2 and len(calls[0]) == 30 and "a photo of a red cat" in calls[0]
    assert "a photo of a pink-colored cup" in calls[1]


# ---------------------------------------------------------------------------------------------------------------
# GenEval reward end to end
# ---------------------------------------------------------------------------------------------------------------
DOG = {"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}
CAT = {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}
RED_DOG = {"prompt": "a photo of a red dog", "tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}


def test_geneval_reward_end_to_end(tmp_path, clip_dir):
    # One query, certain of "dog" (class 16): the detector finds exactly one dog in any image (if its mask is not
    # empty, checked below), so a dog prompt scores 1 and a cat prompt 0.
    detector, processor = build_detector(tmp_path / "det", boost_class=GENEVAL_OBJECTS.index("dog"))
    images = [image(3), image(4, size=(64, 48)), image(5)]
    for picture in images:
        with torch.no_grad():
            out = detector(pixel_values=processor(images=[picture], return_tensors="pt")["pixel_values"])
        assert (out.masks_queries_logits > 0).any(), "pick another seed: the tiny detector's mask is empty"
    fn = geneval_reward(detector=str(tmp_path / "det"), clip=str(clip_dir))
    rewards, info = fn(images, [DOG, json.dumps(CAT), json.dumps(RED_DOG)])
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    assert ((rewards >= 0) & (rewards <= 1)).all()
    assert rewards[:2].tolist() == [1.0, 0.0]
    assert rewards[2].item() in (0.5, 1.0)  # count term 1, colour term 0 or 1
    assert set(info) == {"geneval/correct", "geneval/strict"}
    assert info["geneval/correct"].tolist() == [1.0, 0.0, rewards[2].item() // 1]  # per image: binary verdicts
    assert torch.equal(info["geneval/strict"], info["geneval/correct"])
    again, _ = fn(images, [DOG, json.dumps(CAT), json.dumps(RED_DOG)])
    assert torch.equal(rewards, again)
    with pytest.raises(ValueError, match="JSON"):
        fn(images[:1], ["a photo of a dog"])
    with pytest.raises(ValueError, match="images"):
        fn(images[:2], [DOG])


def test_geneval_reward_partial_credit_is_clipped(tmp_path, clip_dir):
    # Three queries all sure of "dog": the detector finds 3 dogs. One dog wanted: count term 1 - 2 = -1, floored at
    # 0. One dog and three dogs wanted: terms (-1 -> 0, 1), mean 0.5 (0.0 without the floor).
    detector, processor = build_detector(tmp_path / "det", num_queries=3, boost_class=GENEVAL_OBJECTS.index("dog"))
    picture = image(6)
    with torch.no_grad():
        out = detector(pixel_values=processor(images=[picture], return_tensors="pt")["pixel_values"])
    assert (out.masks_queries_logits > 0).flatten(1).any(1).all(), "pick another seed: an empty mask"
    fn = geneval_reward(detector=str(tmp_path / "det"), clip=str(clip_dir))
    both = {"prompt": "a dog and three dogs", "tag": "two_object",
            "include": [{"class": "dog", "count": 1}, {"class": "dog", "count": 3}]}
    rewards, info = fn([picture, picture], [DOG, both])
    assert rewards.tolist() == [0.0, 0.5]
    assert info["geneval/correct"].tolist() == [1.0, 1.0] and info["geneval/strict"].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# PickScore / CLIPScore
# ---------------------------------------------------------------------------------------------------------------
def friendly_clip(directory, sign=1.0, logit_scale=math.log(26 * 0.8)):
    """A tiny CLIP whose image and text embeddings nearly agree (cosine ~ +1, or ~ -1 with sign=-1) but still
    depend on the input: both final layer norms get a shared bias and small weights, the projections are equal."""
    model, _ = build_clip(directory)
    with torch.no_grad():
        for norm, bias_sign in ((model.text_model.final_layer_norm, 1.0), (model.vision_model.post_layernorm, sign)):
            norm.weight.mul_(0.3)
            norm.bias.copy_(torch.linspace(-1, 1, norm.bias.numel()) * bias_sign + 0.5 * bias_sign)
        model.visual_projection.weight.copy_(model.text_projection.weight)
        model.logit_scale.fill_(logit_scale)
    model.save_pretrained(directory)
    return model


def cosines(model, directory, images, texts):
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(directory)
    with torch.no_grad():
        out = model(**processor(text=texts, images=images, return_tensors="pt", padding=True))
    return torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)


def test_pickscore_scales_logit_by_26(tmp_path):
    model = friendly_clip(tmp_path)
    images, prompts = [image(7), image(8)], ["a red dog", {"prompt": "two cats", "tag": "counting"}]
    fn = pickscore_reward(model=str(tmp_path), processor=str(tmp_path))
    rewards, info = fn(images, prompts)
    expected = 0.8 * cosines(model, tmp_path, images, ["a red dog", "two cats"])
    assert rewards.dtype == torch.float32 and rewards.shape == (2,) and info == {}
    assert ((expected > 0.05) & (expected < 0.95)).all() and not torch.allclose(expected[0], expected[1])
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(fn(images, prompts)[0], rewards)
    # a JSON metadata string is read as its "prompt"
    torch.testing.assert_close(fn(images[:1], [json.dumps(DOG | {"prompt": "a red dog"})])[0], rewards[:1])


def test_pickscore_clamps_to_unit_interval(tmp_path):
    friendly_clip(tmp_path, logit_scale=math.log(100.0))  # 100 x cosine ~1 / 26 > 1
    rewards, _ = pickscore_reward(model=str(tmp_path), processor=str(tmp_path))([image(9)], ["a dog"])
    assert rewards.tolist() == [1.0]


def test_clipscore_is_clamped_cosine(tmp_path):
    model = friendly_clip(tmp_path / "up")
    images, texts = [image(10), image(11)], ["a cat", "a blue bus"]
    rewards, info = clipscore_reward(model=str(tmp_path / "up"))(images, texts)
    expected = cosines(model, tmp_path / "up", images, texts)
    assert ((expected > 0.05) & (expected < 0.999)).all()
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-6)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and info == {}
    friendly_clip(tmp_path / "down", sign=-1.0)  # cosine ~ -1 -> clamped to 0
    assert clipscore_reward(model=str(tmp_path / "down"))(images, texts)[0].tolist() == [0.0, 0.0]


def test_random_clip_rewards_are_deterministic_and_in_range(clip_dir):
    images, texts = [image(12), image(13), image(14)], ["a dog", "a cat", "a red car"]
    for factory in (lambda: pickscore_reward(model=str(clip_dir), processor=str(clip_dir)),
                    lambda: clipscore_reward(model=str(clip_dir))):
        first, _ = factory()(images, texts)
        second, _ = factory()(images, texts)
        assert first.shape == (3,) and ((first >= 0) & (first <= 1)).all()
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory,kwarg", [(geneval_reward, "detector"), (pickscore_reward, "model"),
                                           (clipscore_reward, "model")])
def test_missing_local_folder_raises_clear_error(tmp_path, factory, kwarg):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(RuntimeError) as error:
        factory(**{kwarg: missing})
    message = str(error.value)
    assert missing in message and "HF_HUB_OFFLINE" in message and "local folder" in message


def test_broken_local_folder_raises_clear_error(tmp_path, clip_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError) as error:
        geneval_reward(detector=str(tmp_path / "empty"), clip=str(clip_dir))
    assert str(tmp_path / "empty") in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# GenEval training prompts: tools/make_geneval_prompts.py and the shipped data/geneval/train_metadata.jsonl
# ---------------------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(ROOT, "tools", "make_geneval_prompts.py")
EVAL_FILE = os.path.join(ROOT, "data", "geneval", "evaluation_metadata.jsonl")
TRAIN_FILE = os.path.join(ROOT, "data", "geneval", "train_metadata.jsonl")
MIX_TAGS = {"position", "color_attr", "colors", "counting", "two_object"}  # Flow-GRPO's mix: no single_object
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def run_prompt_script(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def request(metadata):
    """Order-free reading of a line, written independently of the script: (tag, clauses, exclude)."""
    include = metadata["include"]
    if metadata["tag"] == "position":
        target, placed = include
        relation = placed["position"][0]
        return "position", min((placed["class"], relation, target["class"]),
                               (target["class"], INVERSE[relation], placed["class"]))
    return (metadata["tag"],
            tuple(sorted(json.dumps(c, sort_keys=True) for c in include)),
            tuple(sorted(json.dumps(c, sort_keys=True) for c in metadata.get("exclude", []))))


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geneval_prompts")
    paths = [tmp / "a.jsonl", tmp / "b.jsonl", tmp / "seed1.jsonl"]
    run_prompt_script(paths[0], "--count", "200", "--seed", "0")
    run_prompt_script(paths[1], "--count", "200", "--seed", "0")
    run_prompt_script(paths[2], "--count", "200", "--seed", "1")
    return paths


@pytest.fixture(scope="module")
def evaluation():
    return read_lines(EVAL_FILE)


def test_geneval_prompt_script_is_deterministic_for_a_seed(small_runs):
    a, b, other_seed = small_runs
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != other_seed.read_bytes()
    assert len(read_lines(a)) == 200


@pytest.mark.parametrize("which", ["small", "shipped"])
def test_geneval_train_prompts_valid_and_disjoint_from_evaluation(which, small_runs, evaluation):
    lines = read_lines(small_runs[0] if which == "small" else TRAIN_FILE)
    eval_prompts = {m["prompt"].strip().lower() for m in evaluation}
    eval_requests = {request(m) for m in evaluation}
    eval_metadata = {json.dumps({k: v for k, v in m.items() if k != "prompt"}, sort_keys=True) for m in evaluation}
    for metadata in lines:
        validate_geneval_metadata(metadata)
        assert set(metadata) <= {"prompt", "tag", "include", "exclude"}
        assert metadata["prompt"].strip().lower() not in eval_prompts, metadata
        assert request(metadata) not in eval_requests, metadata  # also "B and A", "B right of A" for "A left of B"
        assert json.dumps({k: v for k, v in metadata.items() if k != "prompt"}, sort_keys=True) not in eval_metadata


@pytest.mark.parametrize("which", ["small", "shipped"])
def test_geneval_train_prompts_tags_and_counting(which, small_runs):
    lines = read_lines(small_runs[0] if which == "small" else TRAIN_FILE)
    tags = {m["tag"] for m in lines}
    # All six GenEval tags cannot appear: every possible single_object prompt (80 classes) is an evaluation prompt.
    assert tags == MIX_TAGS
    for metadata in lines:
        if metadata["tag"] == "counting":
            (clause,) = metadata["include"]
            assert 2 <= clause["count"] <= 4
            assert metadata["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        else:
            assert "exclude" not in metadata


def test_shipped_geneval_train_prompts_match_the_documented_command(tmp_path):
    # Documented command: python tools/make_geneval_prompts.py (defaults --count 50000 --seed 0; ~5 s on one core);
    # only --out differs, and the output path does not change the content.
    out = tmp_path / "train_metadata.jsonl"
    run_prompt_script(out)
    assert sha256(out) == sha256(TRAIN_FILE)


def test_sd35m_geneval_code_path_runs_one_iteration_with_json_lines_prompts(tmp_path, clip_dir):
    """The sd35m_geneval preset (1 optimizer step per iteration, GenEval metadata prompts, per-tag evaluation,
    unseen CLIPScore) on tiny random models: SD3.5-M's layout, a Mask2Former detector and a CLIP, all local."""
    model, detector = tmp_path / "tiny-sd35m-layout", tmp_path / "detector"
    build_sd35m_layout_pipeline(str(model))
    build_detector(str(detector), boost_class=GENEVAL_OBJECTS.index("dog"), num_queries=2)
    with open(os.path.join(os.path.dirname(crd.__file__), "data", "geneval", "evaluation_metadata.jsonl")) as f:
        lines = [line.strip() for line in f]
    chosen = [next(line for line in lines if json.loads(line)["tag"] == tag) for tag in ("single_object", "colors")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(chosen) + "\n")
    cfg = dataclasses.replace(
        crd.sd35m_geneval(), model=str(model), prompts=str(prompts), eval_prompts=str(prompts), eval_count=2,
        output_dir=str(tmp_path), height=32, width=32, max_sequence_length=4, prompts_per_iteration=2, group_size=2,
        micro_batch_size=2, num_steps=3, train_timesteps=1, eval_num_steps=2, iterations=1, lora_rank=4,
        lora_alpha=8, eval_rewards="clipscore",
        reward_options=f"geneval.detector={detector},geneval.clip={clip_dir},clipscore.model={clip_dir}")
    assert (cfg.reward, cfg.optimizer_steps_per_iteration) == ("geneval", 1)
    metrics = crd.main(cfg)
    m = metrics[0]
    assert m["train/step"] == 1 and math.isfinite(m["loss/crd"]) and 0 <= m["reward/mean"] <= 1
    assert 0 <= m["reward/geneval/correct"] <= 1 and 0 <= m["eval/clipscore"] <= 1
    for tag in ("single_object", "colors"):  # per-tag evaluation, as the benchmark reports it
        assert 0 <= m[f"eval/tag/{tag}/geneval/correct"] <= 1 and f"eval/tag/{tag}/reward" in m
    result = crd.main(dataclasses.replace(cfg, run_name="eval"), eval_only=True)
    assert set(result["per_tag"]) == {"single_object", "colors"}
    assert result["tag_mean"]["geneval/correct"] == pytest.approx(
        np.mean([t["geneval/correct"] for t in result["per_tag"].values()]))


def test_tiny_geneval_preset_runs_two_iterations_on_a_shapes_pipeline(tmp_path, monkeypatch):
    """`python crd.py --preset tiny_geneval`, shrunk to 2 iterations, on an untrained pipeline of the shapes
    model's architecture (tools/pretrain_tiny.build_pipeline at 64x64, word-level tokenizer): GenEval prompts of
    the shapes world, the shapes detector's reward, per-tag held-out accuracy and the partial credit logged.
    Without the model the preset says how to make it."""
    from tools.pretrain_tiny import build_pipeline, shapes_words

    model = tmp_path / "shapes-model"
    pipe = build_pipeline(str(tmp_path / "tokenizer"), height=64, max_length=12, words=shapes_words())
    pipe.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)  # pretraining step (3) sets these
    ids = pipe.tokenizer("a photo of a blue cross and a red square").input_ids
    assert len(ids) == 12 and pipe.tokenizer.unk_token_id not in ids  # <bos>, one token per word, <eos>
    pipe.save_pretrained(str(model))
    plumbing.check_model(crd.tiny_geneval().model)  # the shipped model is a pipeline folder
    missing = str(tmp_path / "tiny-sd3-shapes")  # without it, the preset says how to make it
    with pytest.raises(crd.InputError, match="pretrain_tiny.py --world shapes"):
        plumbing.check_model(missing)
    cfg = dataclasses.replace(crd.tiny_geneval(), model=str(model), output_dir=str(tmp_path), iterations=2,
                              prompts_per_iteration=2, group_size=4, micro_batch_size=8, lora_rank=4, lora_alpha=8,
                              optimizer_steps_per_iteration=1, eval_count=12, eval_start=38, num_steps=4,
                              eval_num_steps=3, sample_every=1)
    assert (cfg.reward, cfg.height, cfg.width, cfg.eval_rewards) == ("geneval_shapes", 64, 64, "geneval_shapes_poly")
    metrics = crd.main(cfg)
    assert [m["train/step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["loss/crd"]) and 0 <= m["reward/mean"] <= 1 and 0 <= m["reward/geneval/correct"] <= 1
    final = metrics[-1]
    assert final["eval/iteration"] == 2 and 0 <= final["eval/reward"] <= 1
    assert 0 <= final["eval/geneval_shapes_poly"] <= 1  # the unseen detector scores every held-out evaluation
    assert {key.split("/")[2] for key in final if key.startswith("eval/tag/")} == {"single_object", "two_object"}
    assert os.path.isfile(os.path.join(tmp_path, cfg.run_name, "samples_0001.png"))
