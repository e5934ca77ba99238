"""CRD's diagnostics, outside the training path: does theta's implicit reward rank a prompt's samples as the reward
does (`implicit_reward_check`, run at every held-out evaluation of a training run; bench/ablate.py runs it on the
held-out half), and does the reward term pull its weight against the KL anchor (`gradient_split`, an opt-in probe
of crd.update: bench/gradient_split.py)?

Neither changes what a run trains: the check draws from its own generators (CHECK_SEED) and leaves theta's adapter
selected; the probe only reads gradients.
"""
import contextlib
import functools
import math

import numpy as np
import torch

from crd import group_center, implicit_reward, interpolate, rollout, training_sigmas, use_adapter, velocity

CHECK_SEED = 10**9  # the check's rollout seeds and (sigma, eps) draws: the same at every evaluation of every run
CHECK_DRAWS = 16  # (sigma, eps) draws averaged per sample: the estimate's noise / 4 (docs/results.md)


@torch.no_grad()
def implicit_reward_estimates(v_theta, v_references, x0, sigmas, draws, generator, group_size, adaptive_norm=True):
    """Eq. (5) of theta against each reference model, averaged over `draws` (sigma, eps) pairs per sample.

    v_theta, v_references[name]: callables (x_sigma (N, C, H, W), sigma (N,)) -> velocity (N, C, H, W); x0: the
    clean samples (N, C, H, W), groups of `group_size` contiguous; sigmas: (S,) the training schedule. Draw m
    uses sigma = sigmas[m mod S] for every sample and one eps (C, H, W) for all of them (common random numbers:
    a group's samples are compared at the same noise, and theta with each reference on the same x_sigma).
    One draw is what a training pass sees: mostly noise (crd/corr ~ 0.01); the mean of M draws has the noise
    divided by sqrt(M). Returns {name: (estimate (N,), se (N,))}: the mean r^ over the draws and the standard
    error over draws of its group-centred value (the noise that matters for a ranking within a group).
    Raises ValueError for draws < 2 (no standard error).
    """
    if draws < 2:
        raise ValueError(f"draws = {draws}: the standard error needs at least 2 (sigma, eps) draws")
    per_draw = {name: [] for name in v_references}
    for m in range(draws):
        sigma = sigmas[m % len(sigmas)].to(x0.device).expand(len(x0))
        eps = torch.randn(x0.shape[1:], generator=generator).to(x0.device).expand_as(x0)
        x_sigma = interpolate(x0, eps, sigma)
        v = v_theta(x_sigma, sigma)
        for name, v_reference in v_references.items():
            per_draw[name].append(implicit_reward(v, v_reference(x_sigma, sigma), eps - x0, adaptive_norm))
    estimates = {}
    for name, values in per_draw.items():
        values = torch.stack(values)  # (M, N)
        centred = (values.view(draws, -1, group_size) - values.view(draws, -1, group_size).mean(2, keepdim=True))
        estimates[name] = (values.mean(0), centred.flatten(1).std(0) / math.sqrt(draws))
    return estimates


def ranking_agreement(estimates, rewards, group_size):
    """Within-group agreement of per-sample estimates (e.g. implicit rewards) with the external rewards.

    estimates, rewards: (N,), groups of `group_size` contiguous. Per group: Spearman's rho (scipy.stats.spearmanr;
    groups where either side is constant are left out) and the pairwise ordering accuracy over the pairs whose
    rewards differ (an estimate tie counts 1/2; groups with no such pair are left out). Returns {"spearman",
    "spearman_se", "accuracy", "accuracy_se"}: the means over groups and their standard errors over groups
    (std / sqrt(groups)), nan where no group counts, and "per_group_accuracy": a list with nan for the groups left
    out (to pair two models on the same prompts). Chance: rho 0, accuracy 0.5.
    """
    from scipy.stats import spearmanr

    x = estimates.detach().double().cpu().view(-1, group_size)
    y = rewards.detach().double().cpu().view(-1, group_size)
    rhos, accuracies = [], []
    for a, b in zip(x, y):
        constant = bool(a.max() == a.min() or b.max() == b.min())
        rhos.append(math.nan if constant else float(spearmanr(a.numpy(), b.numpy()).statistic))
        d_reward, d_estimate = b[:, None] - b[None, :], a[:, None] - a[None, :]
        pairs = d_reward > 0  # each unordered pair once, from its higher-reward side
        agree = (d_estimate[pairs] > 0).double() + 0.5 * (d_estimate[pairs] == 0).double()
        accuracies.append(float(agree.mean()) if pairs.any() else math.nan)

    def mean_se(values):
        values = np.array([v for v in values if not math.isnan(v)])
        if len(values) == 0:
            return math.nan, math.nan
        return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan

    (rho, rho_se), (accuracy, accuracy_se) = mean_se(rhos), mean_se(accuracies)
    return {"spearman": rho, "spearman_se": rho_se, "accuracy": accuracy, "accuracy_se": accuracy_se,
            "per_group_accuracy": accuracies}


def batched_velocity(transformer, adapter, prompt_embeds, pooled, batch_size, autocast):
    """`velocity` of adapter `adapter` as a callable (x_sigma (N, C, H, W), sigma (N,)) -> (N, C, H, W) fp32, over
    the N samples whose text embeddings are prompt_embeds (N, L, D) and pooled (N, D'), in chunks of batch_size."""
    def v(x_sigma, sigma):
        with autocast:
            return torch.cat([velocity(transformer, adapter, x_sigma[part], sigma[part], prompt_embeds[part],
                                       pooled[part]).float()
                              for part in (slice(i, i + batch_size) for i in range(0, len(x_sigma), batch_size))])
    return v


@torch.no_grad()
def implicit_reward_check(pipe, reward_fn, prompts, cfg, draws=CHECK_DRAWS, references=("pretrained", "old"),
                          autocast=contextlib.nullcontext()):
    """Does theta's implicit reward rank its own samples as the reward does? K = cfg.group_size rollouts from theta
    for each prompt (seeds CHECK_SEED + i: the same noise every time), their external rewards, and their implicit
    reward of theta against each reference ('pretrained': the frozen model; 'old': the slow reference) by
    `implicit_reward_estimates` with `draws` (sigma, eps) draws from the training schedule (seeded CHECK_SEED).
    Returns {f"implicit_{key}_{reference}": value} for the keys of `ranking_agreement` (per_group_accuracy as a
    list), the noise ratio implicit_noise_{reference} = mean standard error / mean within-group std of the
    estimates (small: the ranking is not the draws' noise), and "reward": the rollouts' mean reward."""
    group_prompts = [p for p in prompts for _ in range(cfg.group_size)]
    seeds = list(range(CHECK_SEED, CHECK_SEED + len(group_prompts)))
    x0, embeds, pooled, images = rollout(pipe, prompts, seeds, cfg, autocast, adapter="theta")
    rewards, _ = reward_fn(images, group_prompts)
    sigmas = training_sigmas(pipe.scheduler, cfg.num_steps, cfg.timestep_range, cfg.sigma_schedule)
    v = functools.partial(batched_velocity, pipe.transformer, prompt_embeds=embeds, pooled=pooled,
                          batch_size=cfg.micro_batch_size, autocast=autocast)
    estimates = implicit_reward_estimates(v("theta"), {ref: v(None if ref == "pretrained" else ref)
                                                       for ref in references},
                                          x0, sigmas, draws, torch.Generator().manual_seed(CHECK_SEED),
                                          cfg.group_size, cfg.adaptive_norm)
    use_adapter(pipe.transformer, "theta")
    result = {"reward": float(rewards.float().mean())}
    for ref, (estimate, se) in estimates.items():
        result |= {f"implicit_{k}_{ref}": value for k, value in ranking_agreement(estimate, rewards,
                                                                                  cfg.group_size).items()}
        spread = group_center(estimate, cfg.group_size).view(-1, cfg.group_size).std(1).mean()
        result[f"implicit_noise_{ref}"] = float(se.mean() / spread) if spread > 0 else math.nan
    return result


def gradient_split(result, params, sigma):
    """Does the reward term pull its weight? An opt-in `update` probe (bench/gradient_split.py): the gradients of
    one pass's reward term g_R and KL anchor g_KL with respect to theta's parameters, before its backward. Returns
    grad/reward_norm, grad/kl_norm (L2 norms), grad/cos_reward_kl (their cosine) and grad/sigma (the pass's sigma)."""
    def flat_grad(loss):
        if not loss.requires_grad:  # the reward-free control's zero reward term
            return torch.cat([torch.zeros_like(p).flatten() for p in params])
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])

    g_reward, g_kl = flat_grad(result.loss_reward), flat_grad(result.loss_kl)
    return {"grad/reward_norm": g_reward.norm().item(), "grad/kl_norm": g_kl.norm().item(),
            "grad/cos_reward_kl": torch.nn.functional.cosine_similarity(g_reward, g_kl, dim=0).item(),
            "grad/sigma": sigma[0].item()}
