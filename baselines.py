"""The two baselines CRD is measured against, each a pass function with crd.crd_pass's signature and return value.

- `anchor_pass` (--objective anchor, with --no-adaptive-kl: the reward-free control): CRD's pass with the reward
  term dropped, so only the KL anchor to the CFG-guided pretrained model trains theta. A gain of CRD over it is a
  gain of reward learning, not of the anchor's pull toward CFG-like images.
- `nft_pass` (--objective nft): DiffusionNFT (Zheng et al., arXiv:2509.16117), Eqs. (A1)-(A2) of docs/method.md,
  with its sampler snapshot as the reference and a small KL to the pretrained model without CFG.

crd.py picks the pass where a run starts (crd.loss_pass); everything else of Algorithm 1 (rollouts, rewards,
EMA snapshots, evaluation) is CRD's, so a comparison changes the loss alone.
"""
import torch

from crd import Pass, cfg_anchor_kl, crd_pass, implicit_reward, per_sample_mean, velocity

NFT_BETA = 1.0  # beta_NFT of Eq. (A1): DiffusionNFT's default
NFT_KL_WEIGHT = 1e-4  # Eq. (A2)


def anchor_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast):
    """The reward-free control: crd_pass with loss_reward = 0 (its diagnostics kept). Returns a Pass."""
    result = crd_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast)
    return result._replace(loss_reward=torch.zeros((), device=x_sigma.device))


def nft_loss(v_theta, v_old, x_sigma, x0, sigma, rewards, beta=NFT_BETA, floor=1e-5):
    """The DiffusionNFT loss, Eqs. (A1)-(A2) without their KL term.

    v_theta, v_old (the sampler snapshot in NFT), x_sigma, x0: (N, C, H, W); sigma: (N,); rewards r~: (N,) in
    [0, 1] (Eq. 6), not centred. The implicit positive / negative policies v+- = v_old +- beta (v_theta - v_old)
    predict x0^+- = x_sigma - sigma v+-; their adaptively normalised x0 errors are weighted by r~ and 1 - r~.
    Returns a scalar (fp32). With v_theta == v_old both errors are equal and the loss ignores the rewards.
    """
    v_pos = beta * v_theta.float() + (1 - beta) * v_old.float()  # Eq. (A1)
    v_neg = (1 + beta) * v_old.float() - beta * v_theta.float()
    losses = []
    for v in (v_pos, v_neg):
        err = x_sigma.float() - sigma.view(-1, 1, 1, 1) * v - x0.float()
        w = per_sample_mean(err.abs()).detach().clamp_min(floor).view(-1, 1, 1, 1)
        losses.append(per_sample_mean(err ** 2 / w))
    r = rewards.float()
    return 5.0 * (r * losses[0] / beta + (1 - r) * losses[1] / beta).mean()  # Eq. (A2)


def nft_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast):
    """DiffusionNFT's loss on one micro-batch (arguments as crd_pass) with the sampler snapshot as v_old and a KL of
    weight NFT_KL_WEIGHT to the pretrained model without CFG. Returns a Pass (r^ for the diagnostics only)."""
    embeds, pooled = micro.prompt_embeds, micro.pooled
    with autocast, torch.no_grad():
        v_old = velocity(transformer, "sampler", x_sigma, sigma, embeds, pooled)
        v_pre = velocity(transformer, None, x_sigma, sigma, embeds, pooled)
    with autocast:  # theta last: peft trains the adapter selected last (crd.use_adapter)
        v_theta = velocity(transformer, "theta", x_sigma, sigma, embeds, pooled)
    r_hat = implicit_reward(v_theta, v_old, u, cfg.adaptive_norm)
    loss_nft = nft_loss(v_theta, v_old, x_sigma, micro.x0, sigma, micro.rewards_normalized)
    kl = cfg_anchor_kl(v_theta, v_pre, v_pre, 1.0)
    return Pass(loss_nft, NFT_KL_WEIGHT * kl.mean(), kl, r_hat)


PASSES = {"anchor": (anchor_pass, "reward-free control"), "nft": (nft_pass, "DiffusionNFT baseline")}
