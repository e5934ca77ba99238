"""CRD: Centered Reward Distillation for text-to-image flow models, the whole algorithm in one file.

Paper: Zhu, Wang, Lathuiliere, Kalogeiton, "Diffusion Reinforcement Learning via Centered Reward Distillation",
arXiv:2603.14128. The equations and Algorithm 1 as this project reconstructs them (from the first author's
Flow-Factory port, DiffusionNFT and the author's slides) are in docs/method.md: the `# Eq. (n)` and `# Alg. 1, line k`
tags refer to it. Beside this file: baselines.py (the reward-free control and DiffusionNFT), diagnostics.py (the
implicit-reward check), plumbing.py (what is not CRD: the SD3 pipeline, checks, command line, run directory,
evaluation, checkpoints, torchrun), reward.py (the rewards and their contract; GenEval's in geneval.py).

The idea: for each prompt c the KL-regularised optimum is p* = p_old exp(r/beta) / Z(c), so
beta log p*/p_old = r - beta log Z(c). Z(c) is unknown but the same for every sample of c: centring both sides
within the prompt's group of K samples removes it exactly. CRD regresses the centred implicit reward (an ELBO
difference between the trained and a slow reference model, computed on clean samples only) onto the centred
external reward.

Algorithm 1 (main() tags each line; lines 4-7 are inside `update`):
  0  theta_old <- theta; theta_samp <- theta; s <- 0                                    add_lora_adapters
  1  for each iteration:                                                                 main
  2    draw P prompts; K samples each with the sampler snapshot (Euler ODE, no CFG)     draw_prompts, rollout
  3    rewards r in [0, 1]; normalise within groups to r~ (Eq. 6)                        score
  4    for each micro-batch of whole prompt groups:                                      update
  5      for each of T timesteps: noise x0 (Eq. 1), one x_sigma for theta, old, pre      update
  6        r^ (Eq. 5), L_CRD (Eq. 7) + the CFG-anchor KL (Eq. 9) weighted by reward
           (Eq. 10); backward / n_accum                                                  crd_pass
  7        every n_accum passes: clip the gradient norm, AdamW step, s <- s + 1          optimizer_step
  8    move the old and sampler EMA snapshots toward theta (Eq. 8)                       move_snapshots

Deviations and open choices (where the sources differ or are silent; each has a flag; docs/port_comparison.md
sets every field against Flow-Factory's):
  1. Time weighting. Eq. (5) divides each squared error by its detached per-sample mean |error| (Flow-Factory;
     --no-adaptive-norm drops it); Eq. (7) weights each sample's term by its sigma (--time-weighting sigma, the CPU
     default: at theta = old the gradient is then DiffusionNFT's) or uniformly (uniform: Flow-Factory, sd35m_ocr).
  2. Centring within each prompt's group (the paper); --centering batch centres the micro-batch (Flow-Factory).
  3. Eq. (10) scales the KL by the normalised reward r~ of Eq. (6) (Flow-Factory); --kl-reward raw uses r.
  4. Training timesteps: T distinct steps at random from the first floor(timestep_range * num_steps) of the
     sampler schedule, all samples of a pass at one sigma (--no-shared-timesteps: one draw per sample), fresh eps
     per sample; --timestep-draw stratified is Flow-Factory's fixed draw (sd35m_ocr).
  5. Rollouts: the pipeline's deterministic Euler sampler with diffusers' sigma spacing; --sigma-schedule port
     spaces them as Flow-Factory (sd35m_ocr). No DPM-Solver.
  6. The std of Eq. (6) is the population std over the iteration's samples, as DiffusionNFT.
  7. The CPU default caps both EMA decays of Eq. (8) at 0.5 (--old-decay, --sampler-decay): the OCR recipe's
     0.999, built for thousands of optimizer steps, freezes both snapshots within ~100 iterations.
  8. LoRA weights and snapshots stay fp32 on a bf16 model (Flow-Factory keeps them in bf16, where an EMA of 0.999
     barely moves); held-out scores are of theta itself, not of an EMA of theta.

Conventions: sigma = 1 is noise (SD3), x_sigma = (1 - sigma) x0 + sigma eps, velocity target u = eps - x0;
scheduler timestep t = 1000 sigma. Shapes: P prompts per iteration, K samples per prompt (group_size),
N = P*K samples, B a micro-batch of whole groups, (C, H, W) the latent. "mean_CHW" averages over the latent
dimensions of each sample; losses are reduced in fp32. Every draw of iteration i comes from generators seeded by
(seed, i) (plumbing.iteration_generators), so a resumed run repeats a straight one exactly.
"""
import collections
import dataclasses
import math
import os
import re
import sys
import typing
from typing import Annotated, Literal

import numpy as np
import torch

from plumbing import (InputError, PromptCache, Report, RunDirectory, all_gather, average_gradients, check_finite,
                      check_inputs, check_lora_targets, cli, decode_latents, encode_prompts, evaluate, evaluation_due,
                      generate, iteration_generators, load_frozen_pipeline, make_rewards, max_seed, pick_device,
                      sample_latents, schedule_sigmas, setup_distributed)  # not CRD (the pipeline, seeds, checks)


HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "assets", "tiny-sd3-text")
TINY_DATA = os.path.join(HERE, "data", "tiny_ocr")
SHAPES_MODEL = os.path.join(HERE, "assets", "tiny-sd3-shapes")  # the GenEval task's model
MODEL_HINTS = {SHAPES_MODEL: "make it with `python tools/pretrain_tiny.py --world shapes` (~30 min on 2 cores)"}
LORA_TARGETS = ",".join(f"attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                     "add_v_proj", "to_add_out"))  # joint attention only (SD3.5-M's
                                                                                  # attn2 layers get none)


# ----------------------------------------------------------------------------------------------------------------
# The math: pure functions, tensors in and out, in the order of the equations (tested in test_crd.py)
# ----------------------------------------------------------------------------------------------------------------
def interpolate(x0, eps, sigma):
    """Forward (noising) process, Eq. (1): x_sigma = (1 - sigma) x0 + sigma eps.

    x0, eps: (N, C, H, W); sigma: (N,) in [0, 1] (1 = pure noise). Returns (N, C, H, W).
    """
    sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * eps


def per_sample_mean(x):
    """mean_CHW: (N, ...) -> (N,), in fp32."""
    return x.float().flatten(1).mean(dim=1)


def implicit_reward(v_theta, v_old, u, adaptive_norm=True, floor=1e-5):
    """ELBO-difference implicit reward r^ ~ log p_theta(x0|c) - log p_old(x0|c) (up to scale), Eq. (5).

    v_theta, v_old: velocities of the trained and the old model on the SAME x_sigma, (N, C, H, W); u = eps - x0,
    the velocity target (Eq. 2). With adaptive_norm each squared error is divided by its detached per-sample mean
    absolute error (floored at `floor`). Returns (N,) fp32; exactly 0 when v_theta == v_old. Gradients flow
    through v_theta only if v_old is detached.
    """
    err_theta, err_old = (v_theta.float() - u.float()), (v_old.float() - u.float())
    if not adaptive_norm:
        return -per_sample_mean(err_theta ** 2 - err_old ** 2)
    w_theta = per_sample_mean(err_theta.abs()).detach().clamp_min(floor).view(-1, 1, 1, 1)
    w_old = per_sample_mean(err_old.abs()).detach().clamp_min(floor).view(-1, 1, 1, 1)
    return -per_sample_mean(err_theta ** 2 / w_theta - err_old ** 2 / w_old)


def normalize_rewards(rewards, clip=5.0):
    """Group-relative reward normalisation, Eq. (6).

    rewards: (P, K), row p = the K samples of prompt p. A = (r - mean_row r) / (std_all r + 1e-6), clipped to
    [-clip, clip]; returns r~ = clip(0.5 + A / 10, 0, 1), shape (P, K), in [0, 1]. std is the population std over
    all P*K samples. An all-tied batch (Eq. 6 is 0 / 0 there) gives r~ = 0.5 exactly: computed, a float32 group
    mean off by an ulp, divided by 0 + 1e-6, would give 0.5 +- 0.006.
    """
    advantages = (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(correction=0) + 1e-6)
    normalized = (0.5 + advantages.clamp(-clip, clip) / 10).clamp(0.0, 1.0)
    return torch.where(rewards.max() == rewards.min(), torch.full_like(normalized, 0.5), normalized)


def group_center(x, group_size, centering="prompt", detach_mean=False):
    """Subtract the mean of each prompt group (x: (N,) with groups of `group_size` contiguous), Eq. (7).

    centering='batch' subtracts the mean over all N instead. detach_mean=True stops the gradient through the mean
    (the sg(.) of R^ in Eq. 7). Returns (N,).
    """
    groups = x.view(-1, group_size) if centering == "prompt" else x.view(1, -1)
    mean = groups.mean(dim=1, keepdim=True)
    return (groups - (mean.detach() if detach_mean else mean)).flatten()


def centred_rewards(implicit_rewards, rewards, group_size, beta=1.0, centering="prompt"):
    """The two sides of Eq. (7): (beta R^, R), both (N,) fp32, with R = r~ - mean_group r~ and
    R^ = r^ - sg(mean_group r^). implicit_rewards r^: (N,), with gradient; rewards r~: (N,) in [0, 1] (Eq. 6);
    groups of `group_size` contiguous ('batch' centring: one group of N)."""
    target = group_center(rewards.float(), group_size, centering)
    predicted = beta * group_center(implicit_rewards.float(), group_size, centering, detach_mean=True)
    return predicted, target


def distillation_loss(predicted, target, beta=1.0, loss_type="mse", weights=None):
    """The regression of Eq. (7) on its centred sides (`centred_rewards`): mse (5 / beta) mean lambda (beta R^ - R)^2,
    or bce: the mean of lambda BCEWithLogits(beta R^, sigmoid(R)). weights lambda: (N,) >= 0, e.g. each sample's
    sigma (--time-weighting sigma, Deviation 1); None = 1. Returns a scalar (fp32)."""
    if loss_type == "bce":
        scale, per_sample = 1.0, torch.nn.functional.binary_cross_entropy_with_logits(
            predicted, torch.sigmoid(target), reduction="none")
    else:
        scale, per_sample = 5.0 / beta, (predicted - target) ** 2
    return scale * (per_sample if weights is None else weights.float() * per_sample).mean()


def crd_loss(implicit_rewards, rewards, group_size, beta=1.0, centering="prompt", loss_type="mse", weights=None):
    """Centered reward distillation loss, Eq. (7): `distillation_loss` of `centred_rewards`.

    implicit_rewards r^: (N,), with gradient; rewards r~: (N,) normalised external rewards in [0, 1] (Eq. 6);
    groups of `group_size` contiguous. Returns a scalar (fp32). A constant added to the rewards (or implicit
    rewards) of one group does not change it.
    """
    return distillation_loss(*centred_rewards(implicit_rewards, rewards, group_size, beta, centering), beta,
                             loss_type, weights)


def within_group_correlation(x, y, group_size):
    """Diagnostic of Eq. (7): Pearson correlation of x and y inside each prompt group, averaged over the groups.

    x, y: (N,) with groups of `group_size` contiguous (e.g. the implicit rewards r^ and the rewards r~). Groups
    where x or y is constant are left out; returns a float in [-1, 1], or nan if every group is. Near 0 means
    the implicit reward does not rank a prompt's samples as the reward does: the regression is not learning.
    """
    x, y = (group_center(v.detach().float(), group_size).view(-1, group_size) for v in (x, y))
    norm = x.norm(dim=1) * y.norm(dim=1)
    valid = norm > 1e-12
    return float(((x * y).sum(dim=1)[valid] / norm[valid]).mean()) if valid.any() else math.nan


def ema_decay(step, delay=0, start=0.0, rate=0.0, maximum=0.999):
    """EMA decay schedule of Eq. (8) at optimizer step s: 0 before `delay` steps, then min(start + rate (s - delay),
    maximum). OCR: eta_old = ema_decay(s, 0, 0.25, 0.005) and eta_samp = ema_decay(s, 75, 0, 0.0075)."""
    return 0.0 if step < delay else min(start + rate * (step - delay), maximum)


DECAY = re.compile(r"(\d+)-(\d*\.?\d+(?:e-?\d+)?)-(\d*\.?\d+(?:e-?\d+)?)-(\d*\.?\d+(?:e-?\d+)?)")


def decay_schedule(text, flag=""):
    """'DELAY-START-RATE-MAX' (the order of Flow-Factory's old_model_decay string) -> (delay, start, rate, max) for
    `ema_decay`. Raises InputError naming `flag` unless DELAY is an integer >= 0, START, RATE >= 0 and START, MAX in
    [0, 1]."""
    match = DECAY.fullmatch(text.strip().lower())
    delay, start, rate, maximum = (int(match[1]), *map(float, match.groups()[1:])) if match else (0, -1, 0, 0)
    if not (0 <= start <= 1 and 0 <= maximum <= 1):
        raise InputError(f"{flag + ' ' if flag else ''}EMA decay schedule {text!r}: write DELAY-START-RATE-MAX with "
                         f"DELAY an integer >= 0, START and MAX in [0, 1] and RATE >= 0, e.g. 0-0.25-0.005-0.5 (eta "
                         f"= 0 for s < DELAY, then min(START + RATE (s - DELAY), MAX))")
    return delay, start, rate, maximum


@torch.no_grad()
def ema_update(target, source, decay):
    """In place: target <- decay target + (1 - decay) source for paired tensor lists (Eq. 8); decay <= 0 copies."""
    for t, s in zip(target, source):
        if decay <= 0:
            t.copy_(s)
        else:
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)


def cfg_anchor_kl(v_theta, v_pre_cond, v_pre_uncond, guidance_scale):
    """Velocity-space KL to the CFG-guided pretrained model, Eq. (9).

    v_cfg = v_pre(empty) + g (v_pre(c) - v_pre(empty)); returns mean_CHW (v_theta - v_cfg)^2, shape (N,), fp32.
    guidance_scale 1.0 anchors to the pretrained model without CFG.
    """
    v_cfg = v_pre_uncond.float() + guidance_scale * (v_pre_cond.float() - v_pre_uncond.float())
    return per_sample_mean((v_theta.float() - v_cfg) ** 2)


def kl_weights(rewards, kl_beta, adaptive=True, floor=1e-4):
    """Per-sample KL weight, Eq. (10): floor + r (kl_beta - floor) if adaptive, else kl_beta; exactly 0 for
    kl_beta = 0 (no anchor: the floor would otherwise leave a weight floor (1 - r)).

    rewards: (N,) in [0, 1]. Returns (N,): high-reward samples are held near the anchor, low-reward ones are free.
    """
    if not adaptive or kl_beta == 0:
        return torch.full_like(rewards, kl_beta, dtype=torch.float32)
    return floor + rewards.float() * (kl_beta - floor)


# ----------------------------------------------------------------------------------------------------------------
# Config: every field is a --flag with its --help text; plumbing.check_config says what is impossible
# ----------------------------------------------------------------------------------------------------------------
Sizes = collections.namedtuple("Sizes", "samples passes n_accum")  # per process and iteration; see Config.sizes

# Value ranges of Config's fields, as annotations; choices are Literal[...] (plumbing.check_config reads both)
PositiveInt, PositiveFloat = Annotated[int, "> 0"], Annotated[float, "> 0"]
NonNegativeInt, NonNegativeFloat = Annotated[int, ">= 0"], Annotated[float, ">= 0"]
UnitInterval = Annotated[float, "(0, 1]"]
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # AdamW's defaults (docs/port_comparison.md)


def option(default, help):
    """A Config field: its default and its --help text (kept as dataclass field metadata for plumbing.parse_args)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    # run
    run_name: str = option("crd-tiny-ocr", "name of the output folder under output_dir")
    output_dir: str = option("runs", "where runs/<run_name>/ is written")
    seed: NonNegativeInt = option(0, "seeds every draw of the run (prompts, sampling noise, training noise)")
    device: str = option("auto", "auto (cuda > mps > cpu), or a torch device string")
    iterations: PositiveInt = option(150, "number of CRD iterations (Alg. 1 outer loop)")
    resume: str = option("", "checkpoint to continue from exactly ('auto' = runs/<run_name>/checkpoint.pt)")
    overwrite: bool = option(False, "replace the run in runs/<run_name>/ (checkpoint, metrics, LoRA, grids)")
    # model
    model: str = option(TINY_MODEL, "diffusers StableDiffusion3Pipeline: local directory or hub id")
    height: PositiveInt = option(32, "image height in pixels")
    width: PositiveInt = option(96, "image width in pixels")
    max_sequence_length: PositiveInt = option(2, "T5 tokens (the tiny model has no T5: zeros of this length)")
    mixed_precision: Literal["no", "bf16"] = option("no", "bf16 autocast on GPU (LoRA weights stay fp32), or fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (SD3.5-M memory; ~30 % slower)")
    text_encoders_on_cpu: bool = option(False, "keep the text encoders (T5-XXL: ~9.5 GB in bf16) on the CPU")
    prompt_cache: NonNegativeInt = option(0, "keep the text embeddings of N distinct prompts on the CPU; 0 = off")
    lora_rank: PositiveInt = option(32, "LoRA rank r on the attention projections")
    lora_alpha: PositiveInt = option(64, "LoRA alpha (scale alpha / r)")
    lora_targets: str = option(LORA_TARGETS, "comma-separated transformer module names that get LoRA")
    # sampling (Alg. 1, line 2: Euler ODE rollouts from the sampler snapshot, no CFG)
    prompts: str = option(os.path.join(TINY_DATA, "train.txt"), "training prompts, one per line (OCR target quoted)")
    max_prompts: NonNegativeInt = option(0, "train on the first N prompts only; 0 = all")
    prompts_per_iteration: PositiveInt = option(8, "P: prompts drawn per iteration")
    group_size: PositiveInt = option(8, "K: samples per prompt; centring (Eq. 7) needs K >= 2")
    num_steps: PositiveInt = option(10, "Euler steps of a rollout")
    sigma_schedule: Literal["diffusers", "port"] = option("diffusers", "Euler sigmas before the shift (see plumbing)")
    sample_batch_size: PositiveInt = option(64, "rollout images per pipeline call (bounds sampling memory)")
    # evaluation
    eval_prompts: str = option(os.path.join(TINY_DATA, "heldout.txt"), "held-out prompts, never trained on")
    eval_count: PositiveInt = option(256, "held-out prompts scored per evaluation, from line eval_start on")
    eval_start: NonNegativeInt = option(0, "first held-out prompt scored (0-based; 256: prompts 257-512)")
    eval_every: NonNegativeInt = option(25, "evaluate every N iterations, and before and after the run (0: only then)")
    eval_num_steps: PositiveInt = option(10, "Euler steps at evaluation")
    eval_guidance_scale: PositiveFloat = option(1.0, "CFG scale at evaluation (1.0 = none)")
    implicit_check_prompts: NonNegativeInt = option(16, "held-out prompts of the implicit-reward check; 0 = off")
    # reward (the contract: reward.py's docstring)
    reward: str = option("ocr", "reward name in reward.REWARDS, or a weighted sum such as ocr:1,ink:0.5")
    eval_rewards: str = option("ppocr", "comma-separated unseen metrics scored at evaluation, never optimised")
    reward_options: str = option("", "NAME.ARGUMENT=VALUE,... for the reward factories (e.g. ocr.quantize=false)")
    ocr_detection: bool = option(False, "OCR rewards detect text boxes first (full size); off: one line per image")
    # CRD loss
    objective: Literal["crd", "nft", "anchor"] = option("crd", "CRD, or a baseline of baselines.py")
    beta: PositiveFloat = option(1.0, "beta of Eqs. (3)-(7): KL strength toward old = inverse reward temperature")
    adaptive_norm: bool = option(True, "per-sample adaptive normalisation of the denoising errors in Eq. (5)")
    centering: Literal["prompt", "batch"] = option("prompt", "Eq. (7) centring: within each group, or the batch")
    loss_type: Literal["mse", "bce"] = option("mse", "Eq. (7) regression: mse, or BCEWithLogits(beta R^, sigmoid(R))")
    time_weighting: Literal["uniform", "sigma", "normalized-sigma"] = option(
        "sigma", "lambda of Eq. (7): sigma, sigma / mean training sigma, or 1")
    train_timesteps: PositiveInt = option(3, "T: training timesteps per sample per iteration")
    timestep_draw: Literal["random", "stratified"] = option(
        "random", "T distinct steps at random, or a fixed stratified draw (draw_timesteps)")
    shared_timesteps: bool = option(True, "all samples of a pass share its sigma; off: one draw per sample")
    timestep_range: UnitInterval = option(0.99, "train on the first floor(range * num_steps) schedule steps")
    # drift control
    old_decay: str = option("0-0.25-0.005-0.5", "eta_old of Eq. (8) as DELAY-START-RATE-MAX (ema_decay); 0-0-0-0: "
                            "old = theta, 0-1-0-1: old frozen")
    sampler_decay: str = option("75-0-0.0075-0.5", "eta_samp of Eq. (8), the same way; 0-0-0-0: rollouts from theta")
    kl_beta: NonNegativeFloat = option(0.1, "weight of the KL anchor to the pretrained model, Eq. (10); 0 = none")
    kl_cfg: NonNegativeFloat = option(4.5, "CFG scale of the anchor's pretrained velocity, Eq. (9); 1.0 = no CFG")
    adaptive_kl: bool = option(True, "reward-adaptive KL weight of Eq. (10); off: kl_beta for every sample")
    kl_reward: Literal["normalized", "raw"] = option("normalized", "reward in Eq. (10): r~ of Eq. (6), or the raw r")
    # optimisation (AdamW's betas and eps: ADAM_BETAS, ADAM_EPS)
    learning_rate: PositiveFloat = option(1e-3, "AdamW learning rate (constant)")
    weight_decay: NonNegativeFloat = option(1e-4, "AdamW weight decay")
    max_grad_norm: PositiveFloat = option(1.0, "gradient-norm clip")
    optimizer_steps_per_iteration: PositiveInt = option(2, "AdamW steps per iteration (gradients accumulate between)")
    micro_batch_size: PositiveInt = option(32, "samples per forward/backward pass, whole prompt groups")
    # logging (checkpoint.pt is written after every iteration)
    sample_every: PositiveInt = option(5, "save a captioned grid of rollouts every N iterations")
    log_to: Literal["", "tensorboard", "wandb"] = option("", "live curves besides metrics.jsonl (wandb syncs them)")

    def sizes(self, world_size=1):
        """Derived sizes, in one place: samples per process, passes per iteration, n_accum = passes per AdamW step."""
        samples = self.prompts_per_iteration // world_size * self.group_size
        passes = samples // self.micro_batch_size * self.train_timesteps
        return Sizes(samples, passes, passes // self.optimizer_steps_per_iteration)

    def check(self, world_size=1):
        """Raise InputError for sizes Algorithm 1 cannot run with (the value ranges are checked first, by
        plumbing.check_config): K >= 2, whole prompt groups per micro-batch and per process, passes that split into
        the optimizer steps, and T within the kept schedule steps."""
        samples, passes, _ = self.sizes(world_size)
        kept = int(self.timestep_range * self.num_steps)
        decay_schedule(self.old_decay, "--old-decay"), decay_schedule(self.sampler_decay, "--sampler-decay")
        problems = [
            (self.group_size < 2, f"--group-size {self.group_size}: centring within a prompt needs K >= 2 samples"),
            (self.micro_batch_size % self.group_size, f"--micro-batch-size {self.micro_batch_size} is not a multiple "
             f"of --group-size {self.group_size}: micro-batches must hold whole prompt groups"),
            (self.prompts_per_iteration % world_size, f"--prompts-per-iteration {self.prompts_per_iteration} is not "
             f"divisible by the {world_size} processes"),
            (samples % self.micro_batch_size, f"{samples} samples per process are not a whole number of micro-batches "
             f"of {self.micro_batch_size}; change --micro-batch-size or --prompts-per-iteration"),
            (passes % self.optimizer_steps_per_iteration, f"{passes} forward/backward passes per iteration cannot be "
             f"split into {self.optimizer_steps_per_iteration} optimizer steps; change "
             f"--optimizer-steps-per-iteration or --train-timesteps"),
            (kept < 1, f"--timestep-range {self.timestep_range} keeps no step of the {self.num_steps}-step schedule"),
            (self.seed > max_seed(self.iterations, world_size), f"--seed {self.seed} is too large: the generators of "
             f"its iterations (see iteration_generators) need seeds below 2**63; use --seed <= "
             f"{max_seed(self.iterations, world_size)}"),
            (self.timestep_draw == "random" and self.train_timesteps > kept, f"--train-timesteps "
             f"{self.train_timesteps} must be in [1, {kept}] (the kept schedule steps, drawn without replacement; "
             f"--timestep-draw stratified repeats them)")]
        for failed, message in problems:
            if failed:
                raise InputError(message)


OCR_OLD_DECAY, OCR_SAMPLER_DECAY = "0-0.25-0.005-0.999", "75-0-0.0075-0.999"  # Eq. (8) in the OCR recipe


def tiny_ocr():
    """The CPU default: CRD on the embedded tiny SD3 text model with the OCR reward, 150 iterations, both EMA decays
    capped at 0.5 and sigma-weighted Eq. (7) (Deviations 1 and 7, chosen on data/tiny_ocr/val.txt: docs/results.md)."""
    return Config()


def tiny_geneval():
    """GenEval on the CPU: CRD on a tiny SD3 shapes model (64x64 scenes of flat shapes, assets/tiny-sd3-shapes, made
    by tools/pretrain_tiny.py --world shapes) with GenEval's rules on the shapes world's detector
    (reward geneval_shapes, prompts data/tiny_geneval from tools/shapes_world.py). kl_beta 2 was chosen on the
    validation prompts among 0.1 / 0.5 / 2 (GenEval score, 3 seeds each; docs/results.md), with the OCR recipe's EMA
    schedules and uniform time weighting, as it was measured."""
    return dataclasses.replace(
        Config(), run_name="crd-tiny-geneval", model=SHAPES_MODEL, height=64, width=64,
        prompts=os.path.join(HERE, "data", "tiny_geneval", "train.jsonl"),
        eval_prompts=os.path.join(HERE, "data", "tiny_geneval", "heldout.jsonl"), reward="geneval_shapes",
        eval_rewards="geneval_shapes_poly", kl_beta=2.0, iterations=75, old_decay=OCR_OLD_DECAY,
        sampler_decay=OCR_SAMPLER_DECAY, time_weighting="uniform")


def sd35m_ocr():
    """The paper's OCR recipe on SD3.5-M (docs/method.md): 512 px, K = 24, 48 prompts per iteration, and where the
    paper is silent the first author's Flow-Factory config (20 stratified training timesteps of its sigma schedule,
    the first 1,024 training prompts), field by field in docs/port_comparison.md."""
    return dataclasses.replace(
        Config(), run_name="crd-sd35m-ocr", model="stabilityai/stable-diffusion-3.5-medium", height=512, width=512,
        max_sequence_length=256, mixed_precision="bf16", gradient_checkpointing=True, prompts_per_iteration=48,
        group_size=24, num_steps=10, eval_num_steps=40, eval_count=1018, eval_every=20,
        prompts="", eval_prompts=os.path.join(HERE, "data", "ocr_test.txt"), learning_rate=3e-4,
        micro_batch_size=24, sample_batch_size=48, iterations=1000, sample_every=10,
        prompt_cache=2048, ocr_detection=True, old_decay=OCR_OLD_DECAY, sampler_decay=OCR_SAMPLER_DECAY,
        max_prompts=1024, train_timesteps=20, timestep_draw="stratified", timestep_range=1.0, sigma_schedule="port",
        time_weighting="uniform")


def sd35m_geneval():
    """GenEval on SD3.5-M: the OCR recipe, with DiffusionNFT's GenEval values where the paper's are unknown (one
    optimizer step per iteration; its sampler schedule min(0.001 s, 0.5); Flow-Factory's generic old-model schedule
    min(0.25 + 0.001 s, 0.5)), trained on data/geneval/train_metadata.jsonl, scored on GenEval's 553 prompts."""
    return dataclasses.replace(
        sd35m_ocr(), run_name="crd-sd35m-geneval", reward="geneval", eval_rewards="clipscore,pickscore",
        prompts=os.path.join(HERE, "data", "geneval", "train_metadata.jsonl"),
        eval_prompts=os.path.join(HERE, "data", "geneval", "evaluation_metadata.jsonl"), eval_count=553,
        max_prompts=0, optimizer_steps_per_iteration=1, old_decay="0-0.25-0.001-0.5",
        sampler_decay="0-0-0.001-0.5")


PRESETS = {"tiny_ocr": tiny_ocr, "tiny_geneval": tiny_geneval, "sd35m_ocr": sd35m_ocr, "sd35m_geneval": sd35m_geneval}


# ----------------------------------------------------------------------------------------------------------------
# The LoRA adapters theta / old / sampler on the frozen transformer (the SD3 pipeline itself: plumbing.py)
# ----------------------------------------------------------------------------------------------------------------
ADAPTERS = ("theta", "old", "sampler")  # trained policy, implicit-reward reference, rollout policy


def add_lora_adapters(transformer, rank, alpha, targets):
    """Freeze the transformer and give it three LoRA adapters (peft) with identical initial weights.

    Returns {adapter name: list of its LoRA parameters}, the lists aligned element by element, so that
    `ema_update(params["old"], params["theta"], eta)` implements Eq. (8). Adapters off = the pretrained model.
    Raises InputError if a name of `targets` matches no layer.
    """
    from peft import LoraConfig

    check_lora_targets(targets, [n for n, m in transformer.named_modules() if next(m.parameters(False), None)
                                 is not None])  # InputError for a name that matches no layer (peft skips it)
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=targets.split(","))
    for name in ADAPTERS:
        transformer.add_adapter(config, adapter_name=name)
    params = {name: [p for n, p in transformer.named_parameters() if f".{name}." in n] for name in ADAPTERS}
    for p in params["theta"] + params["old"] + params["sampler"]:  # fp32 LoRA weights on a bf16 base model
        p.data = p.data.float()
    for name in ("old", "sampler"):  # theta_old <- theta; theta_samp <- theta
        ema_update(params[name], params["theta"], 0.0)
    use_adapter(transformer, "theta")
    return params


def use_adapter(transformer, name):
    """Route the transformer through LoRA adapter `name`, or through none (the pretrained model) if None.

    NOTE: peft's set_adapter makes the active adapter trainable and the others frozen, so the trained adapter must
    be selected last before its forward pass, as `velocity` does.
    """
    if name is None:
        transformer.disable_adapters()
    else:
        transformer.enable_adapters()
        transformer.set_adapter(name)


def velocity(transformer, adapter, x_sigma, sigma, prompt_embeds, pooled_prompt_embeds):
    """v(x_sigma, t, c) of adapter `adapter` (None = pretrained). x_sigma (B, C, H, W), sigma (B,) -> (B, C, H, W)."""
    use_adapter(transformer, adapter)
    return transformer(hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled_prompt_embeds, return_dict=False)[0]


def training_sigmas(scheduler, num_steps, timestep_range, schedule="diffusers"):
    """The sampler's sigma schedule (`schedule_sigmas`, shifted) without its near-clean tail: the first
    floor(range * steps) values, (S,)."""
    scheduler.set_timesteps(num_steps, sigmas=schedule_sigmas(num_steps, schedule))
    return scheduler.sigmas[: int(timestep_range * num_steps)].float().cpu().clone()


# ----------------------------------------------------------------------------------------------------------------
# The algorithm's steps, in the order main() calls them (Alg. 1, lines 2-8)
# ----------------------------------------------------------------------------------------------------------------
def draw_prompts(prompts, cfg, generator, rank=0, world_size=1):
    """Alg. 1, line 2 (first half): P prompts without replacement and one sampling seed per image, then this rank's
    share, whole groups: prompts [r P/W, (r+1) P/W). Returns (P/W prompts, P/W * K seeds)."""
    chosen = [prompts[i] for i in torch.randperm(len(prompts), generator=generator)[: cfg.prompts_per_iteration]]
    seeds = torch.randint(2**31 - 1, (len(chosen) * cfg.group_size,), generator=generator).tolist()
    share = cfg.prompts_per_iteration // world_size
    mine = slice(rank * share, (rank + 1) * share)
    return chosen[mine], seeds[mine.start * cfg.group_size: mine.stop * cfg.group_size]


@torch.no_grad()
def rollout(pipe, prompts, seeds, cfg, autocast, prompt_cache=None, adapter="sampler"):
    """Alg. 1, line 2: K samples for each prompt from the sampler snapshot (or `adapter`), no CFG.

    prompts: P' prompts; seeds: P' * K ints. Returns x0 (P'K, C, H, W), prompt_embeds (P'K, L, D), pooled
    (P'K, D') and P'K PIL images; the K samples of a prompt are contiguous.
    """
    prompt_embeds, pooled = encode_prompts(pipe, prompts, cfg.max_sequence_length, prompt_cache)
    prompt_embeds = prompt_embeds.repeat_interleave(cfg.group_size, dim=0)
    pooled = pooled.repeat_interleave(cfg.group_size, dim=0)
    use_adapter(pipe.transformer, adapter)
    chunks = []
    for start in range(0, len(seeds), cfg.sample_batch_size):
        part = slice(start, start + cfg.sample_batch_size)
        with autocast:
            chunks.append(sample_latents(pipe, prompt_embeds[part], pooled[part], seeds[part], cfg.height, cfg.width,
                                         cfg.num_steps, 1.0, cfg.max_sequence_length, cfg.sigma_schedule))
    x0 = torch.cat(chunks)
    return x0.float(), prompt_embeds, pooled, decode_latents(pipe, x0)


def score(reward_fn, images, prompts, cfg, iteration, device, rank=0, world_size=1):
    """Alg. 1, line 3: black-box rewards of this rank's images, gathered from every rank, normalised within prompt
    groups (Eq. 6). images, prompts: this rank's N/W images and their prompts (K per prompt, contiguous).

    Returns (this rank's targets for `update`: (r~ (N/W,), the reward that scales Eq. (10) (N/W,)), this rank's raw
    rewards (N/W,), the log entries). Raises FloatingPointError on a non-finite reward.
    """
    rewards_local, info = reward_fn(images, prompts)
    rewards = all_gather(rewards_local.to(device), world_size)  # (P*K,), rank order = prompt order
    if not torch.isfinite(rewards).all():
        raise FloatingPointError(f"non-finite reward at iteration {iteration}: {rewards.tolist()}")
    rewards_normalized = normalize_rewards(rewards.view(-1, cfg.group_size)).flatten()  # Eq. (6)
    mine = slice(rank * len(images), (rank + 1) * len(images))
    targets = (rewards_normalized[mine], (rewards_normalized if cfg.kl_reward == "normalized" else rewards)[mine])
    log = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
           "reward/group_std": rewards.view(-1, cfg.group_size).std(dim=1).mean().item(),
           **{f"reward/{k}": float(v.float().mean()) if torch.is_tensor(v) else v for k, v in info.items()}}
    return targets, rewards_local, log


def draw_timesteps(n_samples, n_sigmas, cfg, generator):
    """Alg. 1, line 5: which of the n_sigmas kept schedule steps each sample trains on, T = cfg.train_timesteps
    distinct ones (without replacement). With cfg.shared_timesteps every sample of a micro-batch gets the same T
    steps, so a group's r^ are compared at one noise level (Deviation 4). With cfg.timestep_draw 'stratified' every
    sample gets steps floor(k (n_sigmas - 1) / T), k = 0 .. T-1, as Flow-Factory's discrete sampler (whose stratified
    jitter rounds away; e.g. 20 of 10 steps: 0,0,0,1,1,2,2,...,8,8). Returns indices (n_samples, T)."""
    if cfg.timestep_draw == "stratified":
        return (torch.arange(cfg.train_timesteps) * (n_sigmas - 1) // cfg.train_timesteps).expand(n_samples, -1)
    n_draws = n_samples // cfg.micro_batch_size if cfg.shared_timesteps else n_samples
    index = torch.stack([torch.randperm(n_sigmas, generator=generator)[:cfg.train_timesteps] for _ in range(n_draws)])
    return index.repeat_interleave(n_samples // n_draws, dim=0)


def draw_noise(x0, generator):
    """eps ~ N(0, I) shaped like x0 (B, C, H, W), one draw per sample, drawn on the CPU from `generator`, on x0's
    device."""
    return torch.randn(x0.shape, generator=generator).to(x0.device)


def time_weights(sigma, sigmas, time_weighting):
    """lambda of Eq. (7) for a pass's samples at noise levels sigma (B,): sigma itself ('sigma', Deviation 1),
    sigma / mean(sigmas) over the training schedule sigmas (S,) ('normalized-sigma': the same shape, mean weight 1
    over the schedule, so the reward term keeps its scale against the KL anchor), or None ('uniform': 1)."""
    if time_weighting == "uniform":
        return None
    return sigma if time_weighting == "sigma" else sigma / sigmas.to(sigma.device).mean()


class Batch(typing.NamedTuple):
    """One iteration's training data for `update`: per sample (groups of K contiguous) the clean latents x0
    (N, C, H, W), prompt_embeds (N, L, D), pooled (N, D'), the normalised rewards r~ (N,) of Eq. (6) and the reward
    that scales Eq. (10) (N,), both in [0, 1]; for every sample the empty prompt's negative_embeds (1, L, D) and
    negative_pooled (1, D') (the CFG of Eq. 9) and the training schedule's sigmas (S,)."""
    x0: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    rewards_normalized: torch.Tensor
    rewards_kl: torch.Tensor
    negative_embeds: torch.Tensor
    negative_pooled: torch.Tensor
    sigmas: torch.Tensor

    def part(self, index):
        """The micro-batch of the samples `index` (a slice of whole groups)."""
        return self._replace(x0=self.x0[index], prompt_embeds=self.prompt_embeds[index], pooled=self.pooled[index],
                             rewards_normalized=self.rewards_normalized[index], rewards_kl=self.rewards_kl[index])


class Pass(typing.NamedTuple):
    """What one pass returns: its two loss terms (scalars, with gradient), the per-sample KL (B,) and r^ (B,)."""
    loss_reward: torch.Tensor
    loss_kl: torch.Tensor
    kl: torch.Tensor
    r_hat: torch.Tensor


def crd_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast):
    """Alg. 1, line 6: CRD's loss on one micro-batch at one noise level.

    micro: a Batch of B samples; x_sigma (B, C, H, W), sigma (B,) and u = eps - x0 (B, C, H, W) from Eqs. (1)-(2).
    Returns a Pass (fp32).
    """
    embeds, pooled, size = micro.prompt_embeds, micro.pooled, len(x_sigma)
    with autocast, torch.no_grad():
        v_old = velocity(transformer, "old", x_sigma, sigma, embeds, pooled)
        v_pre = velocity(transformer, None, torch.cat([x_sigma, x_sigma]), torch.cat([sigma, sigma]),
                         torch.cat([embeds, micro.negative_embeds.expand(size, -1, -1)]),
                         torch.cat([pooled, micro.negative_pooled.expand(size, -1)]))
    with autocast:  # theta last: peft trains the adapter selected last (see use_adapter)
        v_theta = velocity(transformer, "theta", x_sigma, sigma, embeds, pooled)
    r_hat = implicit_reward(v_theta, v_old, u, cfg.adaptive_norm)  # Eq. (5)
    loss_crd = crd_loss(r_hat, micro.rewards_normalized, cfg.group_size, cfg.beta, cfg.centering, cfg.loss_type,
                        time_weights(sigma, micro.sigmas, cfg.time_weighting))  # Eq. (7)
    kl = cfg_anchor_kl(v_theta, *v_pre.chunk(2), cfg.kl_cfg)  # Eq. (9)
    loss_kl = (kl_weights(micro.rewards_kl, cfg.kl_beta, cfg.adaptive_kl) * kl).mean()  # Eq. (10)
    return Pass(loss_crd, loss_kl, kl, r_hat)


def loss_pass(objective):
    """(the pass function, its name) of --objective: crd_pass, or a baseline's from baselines.py with its
    signature (the reward-free control, DiffusionNFT)."""
    if objective == "crd":
        return crd_pass, "CRD"
    import baselines

    return baselines.PASSES[objective]


def optimizer_step(params, optimizer, cfg, state, world_size=1):
    """Alg. 1, line 7: average the accumulated gradients of `params` over the ranks, clip their norm, one AdamW
    step, s <- s + 1. Returns the gradient norm before clipping (FloatingPointError if it is not finite)."""
    average_gradients(params, world_size)
    grad_norm = check_finite(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm), "gradient norm", state)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    return grad_norm.item()


def update(transformer, params, optimizer, batch, cfg, training_rng, autocast, state, n_accum, world_size=1,
           one_pass=crd_pass, probe=None):
    """Alg. 1, lines 4-7: the loss of every micro-batch x training timestep of one iteration (`one_pass`: crd_pass
    or a baseline's), accumulated into AdamW steps of theta; advances state["step"] (s) by the steps taken. Returns
    the per-iteration means of the logged quantities (`summarize`).

    batch: a Batch of N samples; training_rng draws the timesteps and eps. Every n_accum passes: gradients averaged
    over the `world_size` ranks, clipped, one AdamW step. Raises FloatingPointError on a non-finite loss or
    gradient norm, naming the iteration and step. probe(pass, theta's parameters, sigma) -> log entries, if given,
    sees the first pass before its backward (e.g. diagnostics.gradient_split).
    """
    timestep_index = draw_timesteps(len(batch.x0), len(batch.sigmas), cfg, training_rng)  # (N, T)
    passes, grad_norms, extra = [], [], {}
    for start in range(0, len(batch.x0), cfg.micro_batch_size):  # Alg. 1, line 4: whole prompt groups
        part = slice(start, start + cfg.micro_batch_size)
        micro = batch.part(part)
        for j in range(cfg.train_timesteps):  # Alg. 1, line 5
            sigma = batch.sigmas[timestep_index[part, j]].to(micro.x0.device)  # (B,)
            eps = draw_noise(micro.x0, training_rng)
            x_sigma = interpolate(micro.x0, eps, sigma)  # Eq. (1), the same x_sigma for theta, old and pre
            result = one_pass(transformer, micro, x_sigma, sigma, eps - micro.x0, cfg, autocast)  # u, Eq. (2)
            loss = check_finite(result.loss_reward + result.loss_kl, "loss", state)
            if probe is not None and not passes:
                extra = probe(result, params["theta"], sigma)
            (loss / n_accum).backward()  # Alg. 1, line 6: backward / n_accum
            passes.append((Pass(*(t.detach() for t in result)), micro.rewards_normalized))
            if len(passes) % n_accum == 0:  # Alg. 1, line 7
                grad_norms.append(optimizer_step(params["theta"], optimizer, cfg, state, world_size))
    return summarize(passes, grad_norms, cfg, n_accum) | extra


def pass_log(result, rewards, cfg):
    """Is the regression of Eq. (7) learning? The log entries of one pass (a Pass): its losses, the within-group
    correlation of r^ and r~ and the spreads of beta R^ and R, and (squared fit error, squared target) summed over
    the pass, from which `summarize` gives the explained fraction. rewards: r~ of the pass (B,)."""
    predicted, target = centred_rewards(result.r_hat, rewards, cfg.group_size, cfg.beta, cfg.centering)
    log = {f"loss/{cfg.objective}": result.loss_reward.item(), "loss/kl": result.loss_kl.item(),
           "kl/anchor": result.kl.mean().item(), "implicit_reward/mean": result.r_hat.mean().item(),
           "implicit_reward/std": result.r_hat.std().item(),
           "crd/corr": within_group_correlation(result.r_hat, rewards, cfg.group_size),
           "crd/R_hat_std": predicted.std().item(), "crd/R_std": target.std().item()}
    return log, (float(((predicted - target) ** 2).sum()), float((target ** 2).sum()))


def summarize(passes, grad_norms, cfg, n_accum):
    """One iteration's log from its passes [(Pass, r~), ...]: the mean of each `pass_log` entry over the passes (NaNs
    left out), crd/corr_fresh = crd/corr over the passes before the first optimizer step (samples no update of
    this iteration has seen), the mean gradient norm, and crd/explained = 1 - sum (beta R^ - R)^2 / sum R^2
    (<= 0: Eq. (7) explains nothing of the centred rewards)."""
    logs, fits = zip(*(pass_log(result, rewards, cfg) for result, rewards in passes))
    for i, log in enumerate(logs):
        log["crd/corr_fresh"] = log["crd/corr"] if i < n_accum else math.nan
    finite_values = {key: [log[key] for log in logs if not math.isnan(log[key])] for key in logs[0]}
    means = {key: float(np.mean(values)) if values else math.nan for key, values in finite_values.items()}
    fit_error, target_power = sum(f for f, _ in fits), sum(p for _, p in fits)
    return means | {"train/grad_norm": float(np.mean(grad_norms)) if grad_norms else math.nan,
                    "crd/explained": 1 - fit_error / target_power if target_power > 0 else math.nan}


def move_snapshots(params, step, cfg):
    """Alg. 1, line 8: old <- EMA(old, theta, eta_old(s)) and sampler <- EMA(sampler, theta, eta_samp(s)), Eq. (8)
    (eta 0 makes a snapshot a copy of theta). Returns the log entries, with each snapshot's mean lag behind theta in
    iterations, eta / (1 - eta) (an EMA updated once per iteration with decay eta weighs theta of k iterations ago by
    (1 - eta) eta^k; inf for a frozen snapshot)."""
    eta_old, eta_sampler = (ema_decay(step, *decay_schedule(text)) for text in (cfg.old_decay, cfg.sampler_decay))
    ema_update(params["old"], params["theta"], eta_old)
    ema_update(params["sampler"], params["theta"], eta_sampler)
    return {"ema/eta_old": eta_old, "ema/eta_sampler": eta_sampler, "train/step": step,
            "ema/lag_old": eta_old / (1 - eta_old) if eta_old < 1 else math.inf,
            "ema/lag_sampler": eta_sampler / (1 - eta_sampler) if eta_sampler < 1 else math.inf}


# ----------------------------------------------------------------------------------------------------------------
# main: Algorithm 1
# ----------------------------------------------------------------------------------------------------------------
def report(cfg, name):
    """What the run directory shows of CRD's log (plumbing.Report): the console line's fields (label, key, format,
    separator), the diagnostics figure's panels (keys, title, y scale), and the implicit-reward check's panel."""
    console = [("reward", "reward/mean", ".3f", " | "), (f"loss {cfg.objective}", f"loss/{cfg.objective}", ".4f", ""),
               ("kl", "loss/kl", ".5f", " | "), ("r^ std", "implicit_reward/std", ".4f", ""), ("corr", "crd/corr",
               "+.3f", ""), ("fresh", "crd/corr_fresh", "+.3f", ""), ("expl", "crd/explained", "+.3f", " | "),
               ("eta old", "ema/eta_old", ".3f", ""), ("samp", "ema/eta_sampler", ".3f", " | ")]
    panels = [(["crd/corr", "crd/corr_fresh"], "corr(R^, R) within groups", "linear"),
              (["crd/explained"], "explained fraction of R", "linear"),
              (["crd/R_hat_std", "crd/R_std"], "std of beta R^ and of R", "linear"),
              (["ema/lag_old", "ema/lag_sampler"], "EMA snapshots' mean lag (iterations)", "symlog")]
    return Report(name, console, panels, ["crd/corr", "crd/corr_fresh"], (
        "accuracy", "within-group pairwise accuracy", "does theta's implicit reward rank samples as the reward?"))


Job = collections.namedtuple("Job", "rank world_size device run reward_fn pipe prompts prompt_cache autocast "
                                   "one_pass held_out")  # what start_job sets up for main()


def start_job(cfg, training=True, lora=""):
    """Everything before Algorithm 1, for a run (training) or an evaluation of --model [+ lora]: torchrun, the input
    checks (InputError before anything loads), the device and bf16 autocast, the run directory, the rewards, the
    frozen pipeline, the prompt cache, and held_out() = the held-out evaluation (`evaluate`, the same noise every
    time). Returns them as a Job."""
    rank, world_size, local_rank = setup_distributed()
    prompts, eval_prompts, rewards = check_inputs(cfg, world_size, training, lora, MODEL_HINTS.get(cfg.model, ""))
    device = pick_device(cfg.device, local_rank, world_size)
    one_pass, name = loss_pass(cfg.objective)
    run = RunDirectory(cfg, rank, world_size, device, training, report(cfg, name), rewards)
    reward_fn, unseen = make_rewards(rewards, device, rank)
    pipe = load_frozen_pipeline(cfg, device)
    prompt_cache = PromptCache(cfg.prompt_cache) if cfg.prompt_cache else None
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16")

    def images_for(prompts, seeds):  # the held-out sampler: theta in training, else --model (+ --lora) as loaded
        if training:
            use_adapter(pipe.transformer, "theta")
        return generate(pipe, prompts, seeds, cfg.height, cfg.width, cfg.eval_num_steps, cfg.eval_guidance_scale,
                        cfg.max_sequence_length, prompt_cache, cfg.sigma_schedule)

    def held_out():  # the held-out scores, and in training the implicit-reward check (its own seeds: training's
        result = evaluate(images_for, reward_fn, eval_prompts, unseen=unseen)  # draws are unchanged)
        if training and cfg.implicit_check_prompts:
            from diagnostics import implicit_reward_check

            check = implicit_reward_check(pipe, reward_fn, eval_prompts[:cfg.implicit_check_prompts], cfg,
                                          autocast=autocast)
            result["diagnostics"] = {k: v for k, v in check.items() if not isinstance(v, list)}
            result["note"] = "implicit-reward ranking accuracy " + ", ".join(
                f"vs {ref} {check[f'implicit_accuracy_{ref}']:.3f} +- {check[f'implicit_accuracy_se_{ref}']:.3f}"
                for ref in ("pretrained", "old"))
        return result
    return Job(rank, world_size, device, run, reward_fn, pipe, prompts, prompt_cache, autocast, one_pass, held_out)


def main(cfg, probe=None):
    """Train with CRD (Algorithm 1; --objective: a baseline's loss in its place) and return the per-iteration
    metrics. Raises InputError before any expensive work for a mistake in cfg. probe: see `update`."""
    job = start_job(cfg)
    pipe, run = job.pipe, job.run
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every rank
    params = add_lora_adapters(pipe.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)  # Alg. 1, line 0
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params["theta"], lr=cfg.learning_rate, betas=ADAM_BETAS,
                                  weight_decay=cfg.weight_decay, eps=ADAM_EPS)
    state = run.start(params, optimizer)  # {"iteration", "step" (s)}: 0, or where --resume's checkpoint stopped
    sigmas = training_sigmas(pipe.scheduler, cfg.num_steps, cfg.timestep_range, cfg.sigma_schedule)
    with torch.no_grad():
        negative_embeds, negative_pooled = encode_prompts(pipe, [""], cfg.max_sequence_length)  # CFG of Eq. (9)
    first, n_accum = state["iteration"], cfg.sizes(job.world_size).n_accum
    for iteration in run.progress(first):  # Alg. 1, line 1
        log = {"iteration": iteration}
        if evaluation_due(iteration, first, cfg.eval_every):
            run.evaluate(job.held_out, iteration, log)
        rollout_rng, training_rng = iteration_generators(cfg.seed, iteration, job.rank)
        with run.timed(log, "sample"):  # Alg. 1, line 2
            chosen, seeds = draw_prompts(job.prompts, cfg, rollout_rng, job.rank, job.world_size)
            x0, prompt_embeds, pooled, images = rollout(pipe, chosen, seeds, cfg, job.autocast, job.prompt_cache)
        batch_prompts = [p for p in chosen for _ in range(cfg.group_size)]
        with run.timed(log, "reward"):  # Alg. 1, line 3
            targets, rewards, reward_log = score(job.reward_fn, images, batch_prompts, cfg, iteration, job.device,
                                                 job.rank, job.world_size)
            log.update(reward_log)
        with run.timed(log, "train"):  # Alg. 1, lines 4-7
            batch = Batch(x0, prompt_embeds, pooled, *targets, negative_embeds, negative_pooled, sigmas)
            log.update(update(pipe.transformer, params, optimizer, batch, cfg, training_rng, job.autocast, state,
                              n_accum, job.world_size, job.one_pass, probe))
        log.update(move_snapshots(params, state["step"], cfg))  # Alg. 1, line 8
        state["iteration"] = iteration + 1
        if state["iteration"] == cfg.iterations:
            run.evaluate(job.held_out, cfg.iterations, log)
        if run.end_iteration(log, state, params, optimizer, images, batch_prompts, rewards):
            return run.metrics  # stopped by a signal, after writing a checkpoint
    run.finish(pipe.transformer)
    return run.metrics


def evaluate_model(cfg, lora=""):
    """--eval: score --model, with the LoRA folder `lora` if given, on the held-out prompts (no training); returns
    `evaluate`'s dict and writes eval.json and eval_grid.png to the run directory."""
    job = start_job(cfg, training=False, lora=lora)
    return job.run.evaluate_only(job.pipe, job.held_out, lora)


if __name__ == "__main__":
    if sys.modules["__main__"].__dict__ is globals():  # `python crd.py`: baselines.py and diagnostics.py import
        sys.modules["crd"] = sys.modules["__main__"]  # this module as crd, not a second copy (cProfile: a copy)
    sys.exit(cli(main, evaluate_model, Config, PRESETS, description=__doc__.split("\n")[0]))
