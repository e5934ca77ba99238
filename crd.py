"""CRD: Centered Reward Distillation for text-to-image flow models, the whole algorithm in one file.

Paper: Zhu, Wang, Lathuiliere, Kalogeiton, "Diffusion Reinforcement Learning via Centered Reward Distillation",
arXiv:2603.14128. The equations and Algorithm 1 as this project reconstructs them (from the first author's
Flow-Factory port, DiffusionNFT and the author's slides) are in docs/method.md: the `# Eq. (n)` and `# Alg. 1, line k`
tags refer to it. What is not CRD (input checks and the command line, the run directory, held-out evaluation,
checkpoints, curves, torchrun, signals) is in plumbing.py; the rewards in reward.py (GenEval's in geneval.py).

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
  7        every n_accum passes: clip the gradient norm, AdamW step, s <- s + 1          update
  8    move the old and sampler EMA snapshots toward theta (Eq. 8)                       move_snapshots

Deviations and open choices (where the sources differ or are silent; each has a flag):
  1. Time weighting. Eq. (5) divides each squared error by its detached per-sample mean |error| (the port;
     --no-adaptive-norm drops it); Eq. (7) weights each sample's term by its sigma (--time-weighting sigma, the CPU
     default: at theta = old the gradient is then DiffusionNFT's) or uniformly (uniform: the port, sd35m_ocr).
  2. Centring within each prompt's group (the paper); --centering batch centres the micro-batch, as the port.
  3. Eq. (10) scales the KL by the normalised reward r~ of Eq. (6), as the port; --kl-reward raw uses r.
  4. Training timesteps: T distinct steps at random from the first floor(timestep_range * num_steps) of the
     sampler schedule, all samples of a pass at one sigma (the port shares too; --no-shared-timesteps), fresh eps
     per sample (--group-noise: per group); --timestep-draw stratified is the port's fixed draw (sd35m_ocr).
  5. Rollouts: the pipeline's deterministic Euler sampler with diffusers' sigma spacing; --sigma-schedule port
     spaces them as the port (sd35m_ocr). No DPM-Solver.
  6. The std of Eq. (6) is the population std over the iteration's samples, as DiffusionNFT.
  7. The CPU default caps both EMA decays of Eq. (8) at 0.5 (--old-decay-max, --sampler-decay-max): the OCR
     recipe's 0.999, built for thousands of optimizer steps, freezes both snapshots within ~100 iterations.
  8. LoRA weights and snapshots stay fp32 on a bf16 model (the port keeps them in bf16, where an EMA of 0.999
     barely moves); held-out scores are of theta itself, not of an EMA of theta as in the port.

Conventions: sigma = 1 is noise (SD3), x_sigma = (1 - sigma) x0 + sigma eps, velocity target u = eps - x0;
scheduler timestep t = 1000 sigma. Shapes: P prompts per iteration, K samples per prompt (group_size),
N = P*K samples, B a micro-batch of whole groups, (C, H, W) the latent. "mean_CHW" averages over the latent
dimensions of each sample; losses are reduced in fp32. Every draw of iteration i comes from generators seeded by
(seed, i), so a resumed run repeats a straight one exactly.
"""
import collections
import contextlib
import dataclasses
import functools
import math
import os
import sys
import types
import typing
from typing import Annotated, Literal

import numpy as np
import torch

from plumbing import (InputError, RunDirectory, all_gather, average_gradients, check_inputs, check_lora_targets, cli,
                      evaluate, evaluation_due, load_frozen_pipeline, make_rewards, pick_device,
                      setup_distributed)  # not part of CRD


HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "assets", "tiny-sd3-text")
TINY_DATA = os.path.join(HERE, "data", "tiny_ocr")
SHAPES_MODEL = os.path.join(HERE, "assets", "tiny-sd3-shapes")  # the GenEval task's model
MODEL_HINTS = {SHAPES_MODEL: "make it with `python tools/pretrain_tiny.py --world shapes` (~30 min on 2 cores)"}
LORA_TARGETS = ",".join(f"attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                     "add_v_proj", "to_add_out"))  # joint attention (SD3.5-M's attn2
                                                                                  # layers get none, as in the port)


# ----------------------------------------------------------------------------------------------------------------
# Config: every field is a --flag (its comment is the --help text); plumbing.check_config says what is impossible
# ----------------------------------------------------------------------------------------------------------------
Sizes = collections.namedtuple("Sizes", "samples passes n_accum")  # per process and iteration; see Config.sizes


# Value ranges of Config's fields, as annotations; choices are Literal[...] (plumbing.check_config reads both)
PositiveInt, PositiveFloat = Annotated[int, "> 0"], Annotated[float, "> 0"]
NonNegativeInt, NonNegativeFloat = Annotated[int, ">= 0"], Annotated[float, ">= 0"]
Fraction, UnitInterval = Annotated[float, "[0, 1)"], Annotated[float, "(0, 1]"]
Decay = Annotated[float, "[0, 1]"]  # an EMA decay of Eq. (8) that may be 1: the snapshot never moves


@dataclasses.dataclass
class Config:
    # run
    run_name: str = "crd-tiny-ocr"  # name of the output folder under output_dir
    output_dir: str = "runs"  # where runs/<run_name>/ is written
    seed: NonNegativeInt = 0  # seeds every draw of the run (prompts, sampling noise, training noise)
    device: str = "auto"  # auto (cuda > mps > cpu), or a torch device string
    iterations: PositiveInt = 150  # number of CRD iterations (Alg. 1 outer loop)
    resume: str = ""  # checkpoint to continue from exactly ('auto' = runs/<run_name>/checkpoint.pt)
    overwrite: bool = False  # replace the run in runs/<run_name>/ (its checkpoint, metrics, LoRA, grids are deleted)
    # model
    model: str = TINY_MODEL  # diffusers StableDiffusion3Pipeline: local directory or hub id
    height: PositiveInt = 32  # image height in pixels
    width: PositiveInt = 96  # image width in pixels
    max_sequence_length: PositiveInt = 2  # T5 tokens (the tiny model has no T5: zeros of this length)
    mixed_precision: Literal["no", "bf16"] = "no"  # 'bf16' autocast on GPU (LoRA weights stay fp32), 'no' for fp32
    gradient_checkpointing: bool = False  # recompute activations in backward (SD3.5-M memory; ~30 % slower)
    text_encoders_on_cpu: bool = False  # keep the text encoders (T5-XXL: ~9.5 GB in bf16) on the CPU
    prompt_cache: NonNegativeInt = 0  # keep the text embeddings of this many distinct prompts on the CPU; 0 = off
    lora_rank: PositiveInt = 32  # LoRA rank r on the attention projections
    lora_alpha: PositiveInt = 64  # LoRA alpha (scale alpha / r)
    lora_targets: str = LORA_TARGETS  # comma-separated transformer module names that get LoRA
    # sampling
    prompts: str = os.path.join(TINY_DATA, "train.txt")  # training prompts, one per line (OCR target in double quotes)
    max_prompts: NonNegativeInt = 0  # train on the first N lines of --prompts only (the port's cap); 0 = all
    prompts_per_iteration: PositiveInt = 8  # P: prompts drawn per iteration
    group_size: PositiveInt = 8  # K: samples per prompt; centring (Eq. 7) needs K >= 2
    num_steps: PositiveInt = 10  # Euler steps of a rollout
    sigma_schedule: Literal["diffusers", "port"] = "diffusers"  # Euler sigmas before the shift (see schedule_sigmas)
    guidance_scale: PositiveFloat = 1.0  # CFG scale of rollouts (1.0 = none, as in the paper)
    # evaluation
    eval_prompts: str = os.path.join(TINY_DATA, "heldout.txt")  # held-out prompts, never trained on
    eval_count: PositiveInt = 256  # held-out prompts scored per evaluation, from line eval_start on
    eval_start: NonNegativeInt = 0  # first held-out prompt scored (0-based; 256 = prompts 257-512 of data/tiny_ocr)
    eval_every: NonNegativeInt = 25  # evaluate every this many iterations, and before and after the run (0: only then)
    eval_num_steps: PositiveInt = 10  # Euler steps at evaluation
    eval_guidance_scale: PositiveFloat = 1.0  # CFG scale at evaluation (1.0 = none)
    implicit_check_prompts: NonNegativeInt = 16  # at each evaluation, rank K rollouts of theta for the first N
    # held-out prompts by their implicit reward (implicit_reward_check); 0 = off
    implicit_check_draws: PositiveInt = 16  # (sigma, eps) draws averaged per sample by that check (>= 2)
    # reward
    reward: str = "ocr"  # reward name in reward.REWARDS, or a weighted sum such as ocr:1,ink:0.5
    eval_rewards: str = "ppocr"  # comma-separated unseen metrics scored at each evaluation, never optimised; '' = none
    reward_options: str = ""  # reward factories' arguments, NAME.ARGUMENT=VALUE,... (e.g. geneval.detector=DIR)
    ocr_detection: bool = False  # OCR detects text boxes first (full size); off: reads the whole image as one line
    ocr_quantize: bool = True  # EasyOCR int8-quantises its recogniser on a CPU (its default; never on CUDA); off: fp32
    # CRD loss
    objective: Literal["crd", "nft", "anchor"] = "crd"  # CRD, the DiffusionNFT baseline, or the reward-free control
    nft_beta: PositiveFloat = 1.0  # beta_NFT of Eq. (A1), used only with --objective nft
    beta: PositiveFloat = 1.0  # beta of Eqs. (3)-(7): KL strength toward the old model = inverse reward temperature
    adaptive_norm: bool = True  # per-sample adaptive normalisation of the denoising errors in Eq. (5)
    centering: Literal["prompt", "batch"] = "prompt"  # Eq. (7) centring: within each group of K, or the micro-batch
    loss_type: Literal["mse", "bce"] = "mse"  # Eq. (7) regression: mse, or BCEWithLogits(beta R^, sigmoid(R))
    time_weighting: Literal["uniform", "sigma", "normalized-sigma"] = "sigma"  # lambda of Eq. (7): each sample's
    # sigma, sigma / the mean of the training sigmas (mean weight 1), or 1 (the port)
    train_timesteps: PositiveInt = 3  # T: training timesteps per sample per iteration, from the sampler schedule
    timestep_draw: Literal["random", "stratified"] = "random"  # T distinct at random, or the port's (draw_timesteps)
    shared_timesteps: bool = True  # all samples of a pass share its sigma (the port); off: one draw per sample
    group_noise: bool = False  # the K samples of a prompt share the pass's noise eps; off: fresh eps per sample
    timestep_range: UnitInterval = 0.99  # train on the first floor(timestep_range * num_steps) schedule steps
    # drift control
    slow_reference: bool = True  # old = EMA of theta with eta_old of Eq. (8); off: old = theta after every iteration
    old_decay_start: Decay = 0.25  # eta_old(s) = min(start + rate s, max), Eq. (8); start = max = 1: old frozen
    old_decay_rate: NonNegativeFloat = 0.005  # see old_decay_start
    old_decay_max: Decay = 0.5  # see old_decay_start (the OCR recipe's 0.999: sd35m_ocr)
    decoupled_sampler: bool = True  # rollouts from an EMA snapshot with eta_samp of Eq. (8); off: from theta
    sampler_decay_delay: NonNegativeInt = 75  # eta_samp(s) = 0 for s < delay, else min(rate (s - delay), max), Eq. (8)
    sampler_decay_rate: NonNegativeFloat = 0.0075  # see sampler_decay_delay
    sampler_decay_max: Fraction = 0.5  # see sampler_decay_delay (the OCR recipe's 0.999: sd35m_ocr)
    kl_beta: NonNegativeFloat = 0.1  # weight of the KL anchor to the pretrained model, Eq. (10); 0 = no anchor
    kl_cfg: NonNegativeFloat = 4.5  # CFG scale of the anchor's pretrained velocity, Eq. (9); 1.0 = no CFG
    adaptive_kl: bool = True  # reward-adaptive KL weight of Eq. (10); off: kl_beta for every sample
    kl_reward: Literal["normalized", "raw"] = "normalized"  # reward in Eq. (10): r~ of Eq. (6), or the raw r
    # optimisation
    learning_rate: PositiveFloat = 1e-3  # AdamW learning rate (constant)
    adam_beta1: Fraction = 0.9  # AdamW beta1
    adam_beta2: Fraction = 0.999  # AdamW beta2
    weight_decay: NonNegativeFloat = 1e-4  # AdamW weight decay
    adam_eps: PositiveFloat = 1e-8  # AdamW epsilon
    max_grad_norm: PositiveFloat = 1.0  # gradient-norm clip
    skip_nonfinite: bool = False  # skip and count non-finite losses / gradient norms instead of stopping
    optimizer_steps_per_iteration: PositiveInt = 2  # AdamW steps per iteration (gradients accumulate in between)
    micro_batch_size: PositiveInt = 32  # samples per forward/backward pass, whole prompt groups
    sample_batch_size: PositiveInt = 64  # rollout images per pipeline call (bounds sampling memory at full size)
    # logging / checkpoints
    sample_every: PositiveInt = 5  # save a captioned grid of rollouts every this many iterations
    checkpoint_every: PositiveInt = 1  # write checkpoint.pt every this many iterations (and at the end, or on stop)
    log_to: Literal["", "tensorboard", "wandb"] = ""  # live curves besides metrics.jsonl (wandb syncs tensorboard)

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
            (self.implicit_check_prompts and self.implicit_check_draws < 2, f"--implicit-check-draws "
             f"{self.implicit_check_draws}: the check's standard error needs >= 2 draws (or "
             f"--implicit-check-prompts 0)"),
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
        Config(), run_name="crd-tiny-geneval", model=SHAPES_MODEL, height=64,
        width=64, prompts=os.path.join(HERE, "data", "tiny_geneval", "train.jsonl"),
        eval_prompts=os.path.join(HERE, "data", "tiny_geneval", "heldout.jsonl"), reward="geneval_shapes",
        eval_rewards="geneval_shapes_poly", kl_beta=2.0, iterations=75, old_decay_max=0.999, sampler_decay_max=0.999,
        time_weighting="uniform")


def sd35m_ocr():
    """The paper's OCR recipe on SD3.5-M (docs/method.md): 512 px, K = 24, 48 prompts per iteration, and the first
    author's port's OCR config where the paper is silent (20 stratified training timesteps of its sigma schedule, the
    first 1,024 training prompts); every field against the port's: docs/port_comparison.md."""
    return dataclasses.replace(
        Config(), run_name="crd-sd35m-ocr", model="stabilityai/stable-diffusion-3.5-medium", height=512, width=512,
        max_sequence_length=256, mixed_precision="bf16", gradient_checkpointing=True, prompts_per_iteration=48,
        group_size=24, num_steps=10, eval_num_steps=40, eval_count=1018, eval_every=20,
        prompts="", eval_prompts=os.path.join(HERE, "data", "ocr_test.txt"), learning_rate=3e-4,
        micro_batch_size=24, sample_batch_size=48, iterations=1000, sample_every=10, checkpoint_every=10,
        prompt_cache=2048, ocr_detection=True, old_decay_max=0.999, sampler_decay_max=0.999, max_prompts=1024,
        train_timesteps=20, timestep_draw="stratified", timestep_range=1.0, sigma_schedule="port",
        time_weighting="uniform")


def sd35m_geneval():
    """GenEval on SD3.5-M: the OCR recipe, with DiffusionNFT's GenEval values where the paper's are unknown (one
    optimizer step per iteration; its sampler schedule min(0.001 s, 0.5); the port's generic old-model schedule
    min(0.25 + 0.001 s, 0.5)), trained on data/geneval/train_metadata.jsonl, scored on GenEval's 553 prompts."""
    return dataclasses.replace(
        sd35m_ocr(), run_name="crd-sd35m-geneval", reward="geneval", eval_rewards="clipscore,pickscore",
        prompts=os.path.join(HERE, "data", "geneval", "train_metadata.jsonl"),
        eval_prompts=os.path.join(HERE, "data", "geneval", "evaluation_metadata.jsonl"), eval_count=553,
        max_prompts=0, optimizer_steps_per_iteration=1, old_decay_start=0.25, old_decay_rate=0.001, old_decay_max=0.5,
        sampler_decay_delay=0, sampler_decay_rate=0.001, sampler_decay_max=0.5)


PRESETS = {"tiny_ocr": tiny_ocr, "tiny_geneval": tiny_geneval, "sd35m_ocr": sd35m_ocr, "sd35m_geneval": sd35m_geneval}

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


def ema_decay(step, start=0.0, rate=0.0, maximum=0.999, delay=0):
    """EMA decay schedule of Eq. (8): 0 before `delay` optimizer steps, then min(start + rate (s - delay), max).

    OCR: eta_old = ema_decay(s, 0.25, 0.005) and eta_samp = ema_decay(s, 0, 0.0075, delay=75).
    """
    return 0.0 if step < delay else min(start + rate * (step - delay), maximum)


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
    kl_beta = 0 (no anchor: the floor would otherwise leave a weight floor (1 - r), as the port does not).

    rewards: (N,) in [0, 1]. Returns (N,): high-reward samples are held near the anchor, low-reward ones are free.
    """
    if not adaptive or kl_beta == 0:
        return torch.full_like(rewards, kl_beta, dtype=torch.float32)
    return floor + rewards.float() * (kl_beta - floor)


# -- the DiffusionNFT baseline (--objective nft), for side-by-side comparisons -----------------------------------
NFT_KL_WEIGHT = 1e-4  # Eq. (A2)


def nft_loss(v_theta, v_old, x_sigma, x0, sigma, rewards, beta=1.0, floor=1e-5):
    """The DiffusionNFT baseline loss, Eqs. (A1)-(A2) without their KL term (for side-by-side comparisons).

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


# ----------------------------------------------------------------------------------------------------------------
# Model helpers: text embeddings, sampling, the LoRA adapters theta / old / sampler (loading: plumbing.py)
# ----------------------------------------------------------------------------------------------------------------
def encode_prompts(pipe, prompts, max_sequence_length, cache=None):
    """Text-encode prompts with the pipeline's own encoders (which may live on the CPU, see text_encoders_on_cpu).

    prompts: plain strings, or JSON metadata lines (GenEval's format) whose "prompt" field is encoded. Returns
    prompt_embeds (N, L, D) and pooled_prompt_embeds (N, D_pool), on the transformer's device. With a `cache` (a
    PromptCache) each distinct prompt is encoded once, on its own, and served from the CPU afterwards.
    """
    from reward import prompt_text

    if cache is not None:
        return cache(pipe, prompts, max_sequence_length)
    device = pipe.text_encoder.device
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=[prompt_text(p) for p in prompts], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, device=device,
                                              max_sequence_length=max_sequence_length)
    return embeds.to(pipe.transformer.device), pooled.to(pipe.transformer.device)


class PromptCache:
    """Text embeddings of the last `size` distinct prompts, kept on the CPU (functools.lru_cache: the least recently
    used is dropped first). Each prompt is encoded alone, so its embedding never depends on which prompts shared its
    batch and a resumed run sees bitwise the same tensors. Cost: SD3.5-M at 256 T5 tokens holds ~2.7 MB per prompt
    (bf16)."""

    def __init__(self, size):
        self.encode_one = functools.lru_cache(maxsize=size)(self._encode_one)

    @staticmethod
    def _encode_one(pipe, prompt, max_sequence_length):
        embeds, pooled = encode_prompts(pipe, [prompt], max_sequence_length)
        return embeds[0].cpu(), pooled[0].cpu()

    def __call__(self, pipe, prompts, max_sequence_length):
        pairs = [self.encode_one(pipe, prompt, max_sequence_length) for prompt in prompts]
        device = pipe.transformer.device
        return torch.stack([e for e, _ in pairs]).to(device), torch.stack([p for _, p in pairs]).to(device)


@torch.no_grad()
def schedule_sigmas(num_steps, schedule="diffusers"):
    """The N sigmas handed to the scheduler before its shift: None for 'diffusers' (the scheduler's own spacing,
    linspace(1, sigma_min, N)), linspace(1, 1/N, N) for 'port' (Flow-Factory; with SD3.5's shift 3 its 10 steps end
    at sigma 0.25 instead of 0.009)."""
    return None if schedule == "diffusers" else np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()


@torch.no_grad()
def sample_latents(pipe, prompt_embeds, pooled_prompt_embeds, seeds, height, width, num_steps, guidance_scale,
                   max_sequence_length, schedule="diffusers"):
    """Deterministic Euler ODE sampling with the pipeline's scheduler (one generator per sample).

    prompt_embeds (N, L, D), seeds: N ints. guidance_scale 1.0 = no CFG (empty-prompt negative otherwise);
    schedule: see `schedule_sigmas`. Returns the final clean latents x0 (N, C, H/f, W/f), in the transformer's
    (scaled and shifted) latent space.
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    return pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, height=height, width=width,
                num_inference_steps=num_steps, sigmas=schedule_sigmas(num_steps, schedule),
                guidance_scale=guidance_scale, generator=generators, max_sequence_length=max_sequence_length,
                output_type="latent").images


@torch.no_grad()
def decode_latents(pipe, latents, chunk_size=32):
    """Latents (N, C, h, w) -> list of N PIL images, decoded by the VAE in chunks to bound memory."""
    vae = pipe.vae
    images = []
    for chunk in latents.split(chunk_size):
        chunk = chunk.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images += pipe.image_processor.postprocess(vae.decode(chunk).sample.float(), output_type="pil")
    return images


@torch.no_grad()
def generate(pipe, prompts, seeds, height, width, num_steps, guidance_scale=1.0, max_sequence_length=2,
             prompt_cache=None, adapter=None, schedule="diffusers"):
    """Prompts -> PIL images (the held-out evaluation's sampler): text-encode, sample (Euler ODE, one seed per
    prompt), decode. adapter: route the transformer through this LoRA adapter first (`use_adapter`); None leaves it
    as it is (the pretrained model, or a LoRA loaded by --eval). Returns len(prompts) images."""
    if adapter is not None:
        use_adapter(pipe.transformer, adapter)
    embeds, pooled = encode_prompts(pipe, prompts, max_sequence_length, prompt_cache)
    return decode_latents(pipe, sample_latents(pipe, embeds, pooled, seeds, height, width, num_steps, guidance_scale,
                                               max_sequence_length, schedule))


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
SEED_STRIDE = 1_000_003  # iteration i of a run seeded s draws from seed s * SEED_STRIDE + i ...
RANK_STRIDE = 1009       # ... and rank r's training noise from (s * SEED_STRIDE + i) * RANK_STRIDE + r


def max_seed(iterations, world_size=1):
    """The largest --seed whose `iteration_generators` seeds stay below 2**63 for every iteration and rank."""
    return ((2**63 - 1 - (world_size - 1)) // RANK_STRIDE - (iterations - 1)) // SEED_STRIDE


def iteration_generators(seed, iteration, rank):
    """The two generators of one iteration: (rollout_rng: prompts and sampling seeds, the same on every rank;
    training_rng: the training timesteps and eps of this rank). Seeded by (seed, iteration, rank) only, so a resumed
    run repeats exactly the draws of a straight one without storing RNG states."""
    base = seed * SEED_STRIDE + iteration
    return torch.Generator().manual_seed(base), torch.Generator().manual_seed(base * RANK_STRIDE + rank)


def draw_prompts(prompts, cfg, generator, rank=0, world_size=1):
    """Alg. 1, line 2 (first half): P prompts without replacement and one sampling seed per image, then this rank's
    share, whole groups: prompts [r P/W, (r+1) P/W). Returns (P/W prompts, P/W * K seeds)."""
    chosen = [prompts[i] for i in torch.randperm(len(prompts), generator=generator)[: cfg.prompts_per_iteration]]
    seeds = torch.randint(2**31 - 1, (len(chosen) * cfg.group_size,), generator=generator).tolist()
    share = cfg.prompts_per_iteration // world_size
    mine = slice(rank * share, (rank + 1) * share)
    return chosen[mine], seeds[mine.start * cfg.group_size: mine.stop * cfg.group_size]


@torch.no_grad()
def rollout(pipe, prompts, seeds, cfg, autocast, prompt_cache=None):
    """Alg. 1, line 2: K samples for each prompt from the sampler snapshot (theta if not decoupled), no CFG.

    prompts: P' prompts; seeds: P' * K ints. Returns x0 (P'K, C, H, W), prompt_embeds (P'K, L, D), pooled
    (P'K, D') and P'K PIL images; the K samples of a prompt are contiguous.
    """
    prompt_embeds, pooled = encode_prompts(pipe, prompts, cfg.max_sequence_length, prompt_cache)
    prompt_embeds = prompt_embeds.repeat_interleave(cfg.group_size, dim=0)
    pooled = pooled.repeat_interleave(cfg.group_size, dim=0)
    use_adapter(pipe.transformer, "sampler" if cfg.decoupled_sampler else "theta")
    chunks = []
    for start in range(0, len(seeds), cfg.sample_batch_size):
        part = slice(start, start + cfg.sample_batch_size)
        with autocast:
            chunks.append(sample_latents(pipe, prompt_embeds[part], pooled[part], seeds[part], cfg.height, cfg.width,
                                         cfg.num_steps, cfg.guidance_scale, cfg.max_sequence_length,
                                         cfg.sigma_schedule))
    x0 = torch.cat(chunks)
    return x0.float(), prompt_embeds, pooled, decode_latents(pipe, x0)


def score(reward_fn, images, prompts, cfg, iteration, device, rank=0, world_size=1):
    """Alg. 1, line 3: black-box rewards of this rank's images, gathered from every rank, normalised within prompt
    groups (Eq. 6). images, prompts: this rank's N/W images and their prompts (K per prompt, contiguous).

    Returns (this rank's targets for `update`: {"rewards_normalized": r~ (N/W,), "rewards_kl": the reward that
    scales Eq. (10) (N/W,)}, this rank's raw rewards (N/W,), the log entries). Raises FloatingPointError on a
    non-finite reward.
    """
    rewards_local, info = reward_fn(images, prompts)
    rewards = all_gather(rewards_local.to(device), world_size)  # (P*K,), rank order = prompt order
    if not torch.isfinite(rewards).all():
        raise FloatingPointError(f"non-finite reward at iteration {iteration}: {rewards.tolist()}")
    rewards_normalized = normalize_rewards(rewards.view(-1, cfg.group_size)).flatten()  # Eq. (6)
    mine = slice(rank * len(images), (rank + 1) * len(images))
    targets = {"rewards_normalized": rewards_normalized[mine],
               "rewards_kl": (rewards_normalized if cfg.kl_reward == "normalized" else rewards)[mine]}
    log = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
           "reward/group_std": rewards.view(-1, cfg.group_size).std(dim=1).mean().item(),
           **{f"reward/{k}": float(v.float().mean()) if torch.is_tensor(v) else v for k, v in info.items()}}
    return targets, rewards_local, log


def draw_timesteps(n_samples, n_sigmas, cfg, generator):
    """Alg. 1, line 5: which of the n_sigmas kept schedule steps each sample trains on, T = cfg.train_timesteps
    distinct ones (without replacement). With cfg.shared_timesteps every sample of a micro-batch gets the same T
    steps, so a group's r^ are compared at one noise level (Deviation 4). With cfg.timestep_draw 'stratified' every
    sample gets steps floor(k (n_sigmas - 1) / T), k = 0 .. T-1, as the port's discrete sampler (whose stratified
    jitter rounds away; e.g. 20 of 10 steps: 0,0,0,1,1,2,2,...,8,8). Returns indices (n_samples, T)."""
    if cfg.timestep_draw == "stratified":
        return (torch.arange(cfg.train_timesteps) * (n_sigmas - 1) // cfg.train_timesteps).expand(n_samples, -1)
    n_draws = n_samples // cfg.micro_batch_size if cfg.shared_timesteps else n_samples
    index = torch.stack([torch.randperm(n_sigmas, generator=generator)[:cfg.train_timesteps] for _ in range(n_draws)])
    return index.repeat_interleave(n_samples // n_draws, dim=0)


def draw_noise(x0, repeat, generator):
    """eps ~ N(0, I) shaped like x0 (B, C, H, W), drawn on the CPU from `generator`, on x0's device; each draw is
    used by `repeat` consecutive samples (repeat = K with --group-noise: one eps per prompt group)."""
    eps = torch.randn((len(x0) // repeat, *x0.shape[1:]), generator=generator)
    return eps.repeat_interleave(repeat, dim=0).to(x0.device)


def time_weights(sigma, sigmas, time_weighting):
    """lambda of Eq. (7) for a pass's samples at noise levels sigma (B,): sigma itself ('sigma', Deviation 1),
    sigma / mean(sigmas) over the training schedule sigmas (S,) ('normalized-sigma': the same shape, mean weight 1
    over the schedule, so the reward term keeps its scale against the KL anchor), or None ('uniform': 1)."""
    if time_weighting == "uniform":
        return None
    return sigma if time_weighting == "sigma" else sigma / sigmas.to(sigma.device).mean()


class Pass(typing.NamedTuple):
    """What one pass returns: its two loss terms (scalars), the per-sample KL (B,), r^ (B,) and Eq. (7)'s beta R^ and
    R (B,), computed once for the loss and reused by the diagnostics."""
    loss_reward: torch.Tensor
    loss_kl: torch.Tensor
    kl: torch.Tensor
    r_hat: torch.Tensor
    predicted: torch.Tensor
    target: torch.Tensor


def crd_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast):
    """Alg. 1, line 6: CRD's loss on one micro-batch at one noise level.

    micro: the micro-batch's part of `update`'s batch (prompt_embeds (B, L, D), pooled (B, D'), rewards_normalized and
    rewards_kl (B,); the empty prompt's negative_embeds (1, L, D) and negative_pooled (1, D') whole); x_sigma
    (B, C, H, W), sigma (B,) and u = eps - x0 (B, C, H, W) from Eqs. (1)-(2). Returns a Pass (fp32).
    """
    embeds, pooled, size = micro["prompt_embeds"], micro["pooled"], len(x_sigma)
    with autocast, torch.no_grad():
        v_old = velocity(transformer, "old", x_sigma, sigma, embeds, pooled)
        v_pre = velocity(transformer, None, torch.cat([x_sigma, x_sigma]), torch.cat([sigma, sigma]),
                         torch.cat([embeds, micro["negative_embeds"].expand(size, -1, -1)]),
                         torch.cat([pooled, micro["negative_pooled"].expand(size, -1)]))
    with autocast:  # theta last: peft trains the adapter selected last (see use_adapter)
        v_theta = velocity(transformer, "theta", x_sigma, sigma, embeds, pooled)
    r_hat = implicit_reward(v_theta, v_old, u, cfg.adaptive_norm)  # Eq. (5)
    predicted, target = centred_rewards(r_hat, micro["rewards_normalized"], cfg.group_size, cfg.beta, cfg.centering)
    loss_crd = distillation_loss(predicted, target, cfg.beta, cfg.loss_type,
                                 time_weights(sigma, micro["sigmas"], cfg.time_weighting))  # Eq. (7)
    kl = cfg_anchor_kl(v_theta, *v_pre.chunk(2), cfg.kl_cfg)  # Eq. (9)
    loss_kl = (kl_weights(micro["rewards_kl"], cfg.kl_beta, cfg.adaptive_kl) * kl).mean()  # Eq. (10)
    return Pass(loss_crd, loss_kl, kl, r_hat, predicted, target)


def anchor_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast):
    """The reward-free control (--objective anchor): CRD's pass with the reward term dropped, the KL anchor kept."""
    result = crd_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast)
    return result._replace(loss_reward=torch.zeros((), device=x_sigma.device))


def nft_pass(transformer, micro, x_sigma, sigma, u, cfg, autocast):
    """The DiffusionNFT baseline (--objective nft): its loss, Eqs. (A1)-(A2), with its sampler snapshot as the
    reference and a KL of weight NFT_KL_WEIGHT to the pretrained model without CFG. Returns a Pass (r^ and the
    centred sides of Eq. 7 only for the diagnostics)."""
    embeds, pooled = micro["prompt_embeds"], micro["pooled"]
    with autocast, torch.no_grad():
        v_old = velocity(transformer, "sampler", x_sigma, sigma, embeds, pooled)
        v_pre = velocity(transformer, None, x_sigma, sigma, embeds, pooled)
    with autocast:
        v_theta = velocity(transformer, "theta", x_sigma, sigma, embeds, pooled)
    r_hat = implicit_reward(v_theta, v_old, u, cfg.adaptive_norm)
    loss_nft = nft_loss(v_theta, v_old, x_sigma, micro["x0"], sigma, micro["rewards_normalized"], cfg.nft_beta)
    kl = cfg_anchor_kl(v_theta, v_pre, v_pre, 1.0)
    return Pass(loss_nft, NFT_KL_WEIGHT * kl.mean(), kl, r_hat,
                *centred_rewards(r_hat, micro["rewards_normalized"], cfg.group_size, cfg.beta, cfg.centering))


OBJECTIVES = {"crd": crd_pass, "anchor": anchor_pass, "nft": nft_pass}  # --objective -> the loss of one pass


def finite(value, what, cfg, state):
    """True if the scalar tensor `value` is finite. If not: False with --skip-nonfinite (the caller skips the pass or
    step and counts it), else FloatingPointError naming `what` and state's iteration and optimizer step."""
    ok = bool(torch.isfinite(value))
    if ok or cfg.skip_nonfinite:
        return ok
    raise FloatingPointError(f"non-finite {what} {value.item()} at iteration {state['iteration']}, optimizer step "
                             f"{state['step']}")


def pass_diagnostics(result, rewards, cfg):
    """Is the regression of Eq. (7) learning? The log entries of one pass (a Pass), with the within-group correlation
    of r^ and r~ and the spreads of beta R^ and R, and (squared fit error, squared target) summed over the pass, from
    which `summarize` gives the explained fraction. rewards: r~ of the pass (B,)."""
    predicted, target = result.predicted.detach(), result.target
    log = {f"loss/{cfg.objective}": result.loss_reward.item(), "loss/kl": result.loss_kl.item(),
           "kl/anchor": result.kl.mean().item(), "implicit_reward/mean": result.r_hat.mean().item(),
           "implicit_reward/std": result.r_hat.std().item(),
           "crd/corr": within_group_correlation(result.r_hat, rewards, cfg.group_size),
           "crd/R_hat_std": predicted.std().item(), "crd/R_std": target.std().item()}
    return log, (float(((predicted - target) ** 2).sum()), float((target ** 2).sum()))


def reward_term_share(loss_reward, params, n_accum, sigma):
    """Does the reward term pull its weight? Call before the pass's backward and call the result after it, on the
    first pass of an iteration (no gradient accumulated yet): splits that pass's gradient of theta into the reward
    term's g_R (one extra backward) and the KL anchor's g_KL = total - g_R. The result returns the log entries
    grad/reward_norm, grad/kl_norm (L2 norms), grad/cos_reward_kl (cosine of g_R and g_KL) and grad/sigma (the
    pass's noise level)."""
    g_reward = torch.autograd.grad(loss_reward, params, retain_graph=True, allow_unused=True)
    g_reward = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, g_reward)])

    def after_backward():
        g_kl = torch.cat([p.grad.flatten() for p in params]) * n_accum - g_reward
        return {"grad/reward_norm": g_reward.norm().item(), "grad/kl_norm": g_kl.norm().item(),
                "grad/cos_reward_kl": torch.nn.functional.cosine_similarity(g_reward, g_kl, dim=0).item(),
                "grad/sigma": sigma[0].item()}
    return after_backward


def summarize(logs, fits, grad_norms, skipped):
    """One iteration's log from its passes: the mean of each entry over the passes (NaNs left out), the mean
    gradient norm, the count of skipped passes / steps, and crd/explained = 1 - sum (beta R^ - R)^2 / sum R^2
    (<= 0: Eq. (7) explains nothing of the centred rewards)."""
    finite_values = {key: [log[key] for log in logs if not math.isnan(log.get(key, math.nan))]
                     for key in (logs[0] if logs else {})}
    means = {key: float(np.mean(values)) if values else math.nan for key, values in finite_values.items()}
    fit_error, target_power = sum(f for f, _ in fits), sum(p for _, p in fits)
    return means | {"train/grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
                    "train/skipped": skipped,
                    "crd/explained": 1 - fit_error / target_power if target_power > 0 else math.nan}


SHARED_KEYS = ("sigmas", "negative_embeds", "negative_pooled")  # the same for every micro-batch of `update`


def update(transformer, params, optimizer, batch, cfg, training_rng, autocast, state, n_accum, world_size=1):
    """Alg. 1, lines 4-7: the loss of every micro-batch x training timestep of one iteration, accumulated into
    AdamW steps of theta; advances state["step"] (s) by the steps taken. Returns the per-iteration means of the
    logged quantities.

    batch: x0 (N, C, H, W) latents; prompt_embeds (N, L, D), pooled (N, D'); negative_embeds (1, L, D),
    negative_pooled (1, D') for the empty prompt; rewards_normalized r~ (N,) and rewards_kl (N,) in [0, 1];
    sigmas (S,). Groups of K are contiguous. training_rng draws the timesteps and eps. Every n_accum passes:
    gradients averaged over the `world_size` ranks, clipped, one AdamW step. Raises FloatingPointError on a
    non-finite loss or gradient norm, naming the iteration and step (--skip-nonfinite skips and counts them).
    """
    x0, one_pass = batch["x0"], OBJECTIVES[cfg.objective]
    timestep_index = draw_timesteps(len(x0), len(batch["sigmas"]), cfg, training_rng)  # (N, T)
    logs, fits, grad_norms, passes, skipped, first_step = [], [], [], 0, 0, state["step"]
    for start in range(0, len(x0), cfg.micro_batch_size):  # Alg. 1, line 4: whole prompt groups
        part = slice(start, start + cfg.micro_batch_size)
        micro = {key: value if key in SHARED_KEYS else value[part] for key, value in batch.items()}
        for j in range(cfg.train_timesteps):  # Alg. 1, line 5
            sigma = batch["sigmas"][timestep_index[part, j]].to(x0.device)  # (B,)
            eps = draw_noise(micro["x0"], cfg.group_size if cfg.group_noise else 1, training_rng)
            x_sigma = interpolate(micro["x0"], eps, sigma)  # Eq. (1), the same x_sigma for theta, old and pre
            result = one_pass(transformer, micro, x_sigma, sigma, eps - micro["x0"], cfg, autocast)  # u, Eq. (2)
            loss, passes = result.loss_reward + result.loss_kl, passes + 1
            if finite(loss, "loss", cfg, state):
                share = (reward_term_share(result.loss_reward, params["theta"], n_accum, sigma)
                         if passes == 1 and result.loss_reward.requires_grad else None)  # diagnostics, first pass
                (loss / n_accum).backward()  # Alg. 1, line 6: backward / n_accum
                log, fit = pass_diagnostics(result, micro["rewards_normalized"], cfg)
                log["crd/corr_fresh"] = log["crd/corr"] if state["step"] == first_step else math.nan  # before a step
                logs.append(log | (share() if share else {}))
                fits.append(fit)
            else:
                skipped += 1
            if passes % n_accum == 0:  # Alg. 1, line 7
                average_gradients(params["theta"], world_size)
                grad_norm = torch.nn.utils.clip_grad_norm_(params["theta"], cfg.max_grad_norm)
                if finite(grad_norm, "gradient norm", cfg, state):
                    optimizer.step()
                    grad_norms.append(grad_norm.item())
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
    return summarize(logs, fits, grad_norms, skipped)


def move_snapshots(params, step, cfg):
    """Alg. 1, line 8: old <- EMA(old, theta, eta_old(s)) and sampler <- EMA(sampler, theta, eta_samp(s)), Eq. (8);
    --no-slow-reference / --no-decoupled-sampler make them copies of theta (eta 0). Returns the log entries, with
    each snapshot's mean lag behind theta in iterations, eta / (1 - eta) (an EMA updated once per iteration with
    decay eta weighs theta of k iterations ago by (1 - eta) eta^k; inf for a frozen snapshot)."""
    eta_old = (ema_decay(step, cfg.old_decay_start, cfg.old_decay_rate, cfg.old_decay_max)
               if cfg.slow_reference else 0.0)
    eta_sampler = (ema_decay(step, 0.0, cfg.sampler_decay_rate, cfg.sampler_decay_max, cfg.sampler_decay_delay)
                   if cfg.decoupled_sampler else 0.0)
    ema_update(params["old"], params["theta"], eta_old)
    ema_update(params["sampler"], params["theta"], eta_sampler)
    return {"ema/eta_old": eta_old, "ema/eta_sampler": eta_sampler, "train/step": step,
            "ema/lag_old": eta_old / (1 - eta_old) if eta_old < 1 else math.inf,
            "ema/lag_sampler": eta_sampler / (1 - eta_sampler)}


# ----------------------------------------------------------------------------------------------------------------
# The method's own diagnostic: does theta's implicit reward rank a prompt's samples as the reward does?
# ----------------------------------------------------------------------------------------------------------------
CHECK_SEED = 10**9  # the check's rollout seeds and (sigma, eps) draws: the same at every evaluation of every run


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
def implicit_reward_check(pipe, reward_fn, prompts, cfg, draws, references=("pretrained", "old"),
                          autocast=contextlib.nullcontext()):
    """Does theta's implicit reward rank its own samples as the reward does? K = cfg.group_size rollouts from theta
    for each prompt (seeds CHECK_SEED + i: the same noise every time), their external rewards, and their implicit
    reward of theta against each reference ('pretrained': the frozen model; 'old': the slow reference) by
    `implicit_reward_estimates` with `draws` (sigma, eps) draws from the training schedule (seeded CHECK_SEED).
    Returns {f"implicit_{key}_{reference}": value} for the keys of `ranking_agreement` (per_group_accuracy as a
    list), the noise ratio implicit_noise_{reference} = mean standard error / mean within-group std of the
    estimates (small: the ranking is not the draws' noise), and "reward": the rollouts' mean reward."""
    group_prompts = [p for p in prompts for _ in range(cfg.group_size)]
    embeds, pooled = encode_prompts(pipe, prompts, cfg.max_sequence_length)
    embeds, pooled = embeds.repeat_interleave(cfg.group_size, 0), pooled.repeat_interleave(cfg.group_size, 0)
    seeds = range(CHECK_SEED, CHECK_SEED + len(group_prompts))
    use_adapter(pipe.transformer, "theta")
    with autocast:
        x0 = torch.cat([sample_latents(pipe, embeds[i:i + cfg.sample_batch_size], pooled[i:i + cfg.sample_batch_size],
                                       seeds[i:i + cfg.sample_batch_size], cfg.height, cfg.width, cfg.num_steps, 1.0,
                                       cfg.max_sequence_length, cfg.sigma_schedule)
                        for i in range(0, len(seeds), cfg.sample_batch_size)]).float()
    rewards, _ = reward_fn(decode_latents(pipe, x0), group_prompts)
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


# ----------------------------------------------------------------------------------------------------------------
# main: Algorithm 1
# ----------------------------------------------------------------------------------------------------------------
def start_job(cfg, training=True, lora=""):
    """Everything before Algorithm 1, for a run (training) or an evaluation of --model [+ lora]: torchrun, the input
    checks (InputError before anything loads), the device and bf16 autocast, the run directory, the rewards, the
    frozen pipeline, the prompt cache, and held_out() = the held-out evaluation (`evaluate`, the same noise every
    time). Returns them as one namespace."""
    rank, world_size, local_rank = setup_distributed()
    prompts, eval_prompts = check_inputs(cfg, world_size, training, lora, MODEL_HINTS.get(cfg.model, ""))
    device = pick_device(cfg.device, local_rank, world_size)
    run = RunDirectory(cfg, rank, world_size, device, training)
    reward_fn, unseen = make_rewards(cfg, device, rank)
    pipe = load_frozen_pipeline(cfg, device)
    prompt_cache = PromptCache(cfg.prompt_cache) if cfg.prompt_cache else None
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    images_for = functools.partial(generate, pipe, height=cfg.height, width=cfg.width, num_steps=cfg.eval_num_steps,
                                   guidance_scale=cfg.eval_guidance_scale, max_sequence_length=cfg.max_sequence_length,
                                   prompt_cache=prompt_cache, adapter="theta" if training else None,
                                   schedule=cfg.sigma_schedule)

    def held_out():  # the held-out scores, and in training the implicit-reward check (its own seeds: training's
        result = evaluate(images_for, reward_fn, eval_prompts, unseen=unseen)  # draws are unchanged)
        if training and cfg.implicit_check_prompts:
            check = implicit_reward_check(pipe, reward_fn, eval_prompts[:cfg.implicit_check_prompts], cfg,
                                          cfg.implicit_check_draws, autocast=autocast)
            result["diagnostics"] = {k: v for k, v in check.items() if not isinstance(v, list)}
            result["note"] = "implicit-reward ranking accuracy " + ", ".join(
                f"vs {ref} {check[f'implicit_accuracy_{ref}']:.3f} +- {check[f'implicit_accuracy_se_{ref}']:.3f}"
                for ref in ("pretrained", "old"))
        return result
    return types.SimpleNamespace(rank=rank, world_size=world_size, device=device, run=run, reward_fn=reward_fn,
                                 pipe=pipe, prompts=prompts, prompt_cache=prompt_cache, held_out=held_out,
                                 autocast=autocast)


def main(cfg):
    """Train with CRD (Algorithm 1) and return the per-iteration metrics. Raises InputError before any expensive
    work for a mistake in cfg."""
    job = start_job(cfg)
    pipe, run = job.pipe, job.run
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every rank
    params = add_lora_adapters(pipe.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)  # Alg. 1, line 0
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params["theta"], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
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
            batch = {"x0": x0, "prompt_embeds": prompt_embeds, "pooled": pooled, "sigmas": sigmas,
                     "negative_embeds": negative_embeds, "negative_pooled": negative_pooled, **targets}
            log.update(update(pipe.transformer, params, optimizer, batch, cfg, training_rng, job.autocast, state,
                              n_accum, job.world_size))
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
    sys.exit(cli(main, evaluate_model, Config, PRESETS, description=__doc__.split("\n")[0]))
