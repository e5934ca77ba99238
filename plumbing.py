"""Plumbing for crd.py, not part of CRD: the SD3 pipeline (loading, text embeddings, Euler sampling, decoding), input
checks and the command line, the run directory (metrics.jsonl, grids, console), held-out evaluation, checkpoints
and resume, curves and live logging, torchrun, signals.

crd.py imports what it needs from here and says what to show of its log (Report); nothing here imports crd.py or
names an objective or a key of CRD's log. Read crd.py first.
"""
import argparse
import collections
import contextlib
import dataclasses
import fcntl
import functools
import glob
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import typing
import warnings
import zipfile

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

import reward


class InputError(ValueError):
    """A mistake in what the user passed: a flag, a file, a checkpoint, a model or LoRA folder, the environment.

    The command line prints it as one line with no traceback and exits with status 2; bugs keep their traceback.
    """


class Report(typing.NamedTuple):
    """What the algorithm wants shown of its log (crd.report): its name, the console line's fields
    [(label, key, format, separator after)], the diagnostics figure's panels [(keys, title, y scale)], the keys
    drawn with a running mean, and the reward curve's second panel (name in the eval/diag/* keys, y label, title).
    The run directory knows no key of its own beyond reward/mean, eval/* and time/*."""
    name: str
    console: list
    panels: list
    smoothed: list
    held_out_panel: tuple


class Rewards(typing.NamedTuple):
    """--reward, --eval-rewards and --reward-options, each parsed once (check_inputs): the trained reward's terms
    [(name, weight)], the unseen metrics' names, and the factories' options {name: {argument: value}}."""
    trained: list
    unseen: list
    options: dict


# -- the run directory --------------------------------------------------------------------------------------------
TIME_PARTS = ("sample", "reward", "train", "eval", "other")
RUN_OUTPUTS = ("checkpoint.pt", "checkpoint.pt.tmp", "metrics.jsonl", "samples_*.png", "eval_[0-9]*.png",
               "reward_curve.png", "diagnostics.png", "lora", "tensorboard")  # a training run's files (--overwrite)
HELD_LOCKS = {}  # run directory (real path) -> the open lock file this process holds on it


def lock_run_directory(directory):
    """Hold an exclusive lock (fcntl.flock) on <directory>/.lock until release_run_directory or the end of the
    process: the system drops it when the process ends, even by kill -9, so a stale file never blocks. A process
    holding it already keeps it. Raises InputError at once if another process holds it."""
    key = os.path.realpath(directory)
    if key not in HELD_LOCKS:
        lock = open(os.path.join(directory, ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise InputError(f"the run directory {directory} is in use by another run (process {holder}); wait for it "
                             f"to end, or pass another --run-name") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        HELD_LOCKS[key] = lock
    return HELD_LOCKS[key]


def release_run_directory(directory):
    """Release this process's lock on `directory` (lock_run_directory), if it holds one."""
    lock = HELD_LOCKS.pop(os.path.realpath(directory), None)
    if lock is not None:
        lock.close()


def claim_run_directory(directory, cfg):
    """A training run's claim on its folder, under its lock (rank 0): the files it appends to must be writable, and a
    folder that already holds a run (a checkpoint, metrics lines or a LoRA) is continued only with --resume and
    replaced only with --overwrite, which deletes that run's files (RUN_OUTPUTS) first; otherwise InputError names
    the ways out. Nothing of a finished or interrupted run is lost by running the same command twice."""
    metrics = os.path.join(directory, "metrics.jsonl")
    try:
        if os.path.exists(metrics):
            open(metrics, "a").close()  # a read-only metrics.jsonl fails here, before any model loads
    except OSError as error:
        raise InputError(f"cannot write {metrics} ({error.strerror}); make it writable (chmod u+w) or pass another "
                         f"--run-name") from None
    held = [name for name in ("checkpoint.pt", "metrics.jsonl", "lora") if os.path.exists(os.path.join(directory, name))
            and not (name == "metrics.jsonl" and os.path.getsize(metrics) == 0)]
    if cfg.overwrite:
        for path in (p for pattern in RUN_OUTPUTS for p in glob.glob(os.path.join(glob.escape(directory), pattern))):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif held and not cfg.resume:
        raise InputError(f"{directory} already holds a run ({', '.join(held)}): continue it with --resume auto, start "
                         f"another with --run-name NAME, or replace it with --overwrite")


def read_metrics(path, say=print):
    """The lines of a metrics.jsonl as dicts. A torn last line (a write cut short by a kill) is dropped, and `say`
    tells so; an unreadable line before it raises InputError."""
    with open(path) as f:
        lines = f.read().splitlines()
    metrics = []
    for number, line in enumerate(lines, 1):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise InputError(f"{path} line {number} is not JSON; remove it, or start afresh with --overwrite") \
                    from None
            say(f"dropped the torn last line of {path} (a write cut short): {line[:40]!r}...")
    return metrics


class RunDirectory:
    """What a run writes under runs/<run_name>/ and prints, kept out of main(): metrics.jsonl (one line per
    iteration), the samples_* and eval_* grids, checkpoint.pt, the LoRA, the curves, the console lines and the
    optional live tracker (--log-to). Only rank 0 writes and prints. A training run locks the folder and claims it
    (lock_run_directory, claim_run_directory: refused if in use, or if it holds a run not resumed or overwritten)."""

    def __init__(self, cfg, rank, world_size, device, training, report, rewards):
        self.cfg, self.rank, self.world_size, self.device, self.report = cfg, rank, world_size, device, report
        self.dir = os.path.join(cfg.output_dir, cfg.run_name)
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.checkpoint_path = os.path.join(self.dir, "checkpoint.pt")
        self.metrics, self.tracker, self.started = [], Tracker("", self.dir, cfg), 0.0
        self.say = tqdm.write if rank == 0 else (lambda *args, **kwargs: None)
        os.makedirs(self.dir, exist_ok=True)
        if training and rank == 0:
            lock_run_directory(self.dir)
            claim_run_directory(self.dir, cfg)
        self.say(reward_line(cfg, rewards))

    def start(self, params, optimizer):
        """The counters {"iteration", "step"}: zeros, or those of --resume's checkpoint, whose LoRA weights and
        optimizer state are loaded; metrics.jsonl keeps its lines before the checkpoint's iteration."""
        cfg, state = self.cfg, {"iteration": 0, "step": 0}
        n_local, passes, n_accum = cfg.sizes(self.world_size)
        self.say(f"{self.report.name} on {self.world_size} x {self.device}: {cfg.prompts_per_iteration} prompts x "
                 f"{cfg.group_size} samples = {cfg.prompts_per_iteration * cfg.group_size} images per iteration, "
                 f"{n_local} per process; {passes} passes of {cfg.micro_batch_size} samples (x{cfg.train_timesteps} "
                 f"timesteps) per process -> {cfg.optimizer_steps_per_iteration} optimizer steps of {n_accum} "
                 f"accumulated passes")
        resume = self.checkpoint_path if cfg.resume == "auto" else cfg.resume
        if resume:
            state = load_checkpoint(resume, cfg, params, optimizer)
            self.say(f"resumed from {resume} at iteration {state['iteration']}, optimizer step {state['step']}")
            if os.path.isfile(self.metrics_path):  # keep the history up to the checkpoint, drop what came after
                self.metrics = [m for m in read_metrics(self.metrics_path, self.say)
                                if m["iteration"] < state["iteration"]]
        if self.rank == 0:
            with open(self.metrics_path, "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in self.metrics)
            self.tracker = Tracker(cfg.log_to, self.dir, cfg)
        return state

    def progress(self, first):
        """Iterations first .. cfg.iterations - 1 under a tqdm bar (rank 0), each one's start time noted."""
        for iteration in tqdm(range(first, self.cfg.iterations), desc=self.report.name, initial=first,
                              total=self.cfg.iterations, disable=self.rank != 0):
            self.started = time.time()
            yield iteration

    @contextlib.contextmanager
    def timed(self, log, part):
        """log["time/<part>"] = seconds spent in the with-block (one of TIME_PARTS)."""
        t0 = time.time()
        yield
        log[f"time/{part}"] = time.time() - t0

    def evaluate(self, held_out, iteration, log):
        """Score theta on the held-out prompts (rank 0; `held_out` is `evaluate` with its arguments bound), save the
        grid as eval_<iteration>.png and add the eval/* entries to `log`; every rank waits for it."""
        if self.rank == 0:
            t0 = time.time()
            result = held_out()
            result["grid"].save(os.path.join(self.dir, f"eval_{iteration:04d}.png"))
            self.tracker.log({}, iteration, images={"eval/grid": result["grid"]})
            log.update({"eval/reward": result["reward"], "eval/exact": result["exact"], "eval/iteration": iteration,
                        "eval/pixel_std": result["pixel_std"], "eval/blank": result["blank"],
                        **{f"eval/{k}": v for k, v in {**result["unseen"], **result["per_image"]}.items()},
                        **{f"eval/tag/{tag}/{k}": v for tag, values in result["per_tag"].items()
                           for k, v in values.items()},
                        **{f"eval/diag/{k}": v for k, v in result.get("diagnostics", {}).items()},
                        "time/eval": log.get("time/eval", 0.0) + time.time() - t0})  # two in one iteration: both
            self.say(f"iteration {iteration}: " + evaluation_line(result, self.cfg))
        barrier(self.world_size)

    def evaluate_only(self, pipe, held_out, lora=""):
        """--eval: score the base model, or it with a saved LoRA, on the held-out prompts; write eval_grid.png and
        eval.json, print the scores (per GenEval tag when the prompts carry one). Returns `evaluate`'s dict."""
        cfg = self.cfg
        if lora:
            load_lora(pipe, lora)
        result = held_out()
        result["grid"].save(os.path.join(self.dir, "eval_grid.png"))
        with open(os.path.join(self.dir, "eval.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k not in ("rewards", "unseen_rewards", "grid")} | {
                "lora": lora, "guidance_scale": cfg.eval_guidance_scale, "num_steps": cfg.eval_num_steps,
                "per_prompt": {"reward": result["rewards"].tolist()} | {  # in prompt order: for paired differences
                    name: values.tolist() for name, values in result["unseen_rewards"].items()}}, f)
        for line in evaluation_only_lines(result, cfg, os.path.join(self.dir, "eval_grid.png")):
            self.say(line)
        return result

    def end_iteration(self, log, state, params, optimizer, images, prompts, rewards):
        """After an iteration (rank 0): a grid of its rollouts every --sample-every, checkpoint.pt, its line of
        metrics.jsonl, the tracker and the console. Returns True if a SIGINT / SIGTERM asked the run to stop (the
        checkpoint is then written). Raises NonFiniteWeights, before writing anything, if a LoRA weight is inf or
        nan."""
        cfg, iteration, stopping = self.cfg, log["iteration"], bool(STOP_REQUESTED)  # read once: stop => checkpoint
        check_finite_weights(params, iteration, state)  # inf / nan weights are never saved: stop before
        if self.rank == 0:
            if iteration % cfg.sample_every == 0:
                captions = [f"{caption(p)}|{r:.2f}" for p, r in zip(prompts, rewards.tolist())]
                image_grid(images[:64], captions[:64], columns=cfg.group_size).save(
                    os.path.join(self.dir, f"samples_{iteration:04d}.png"))
            save_checkpoint(self.checkpoint_path, cfg, params, optimizer, state)
            log["time/iteration"] = time.time() - self.started
            log["time/other"] = log["time/iteration"] - sum(log.get(f"time/{k}", 0) for k in TIME_PARTS[:-1])
            self.metrics.append(log)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(log) + "\n")
            self.tracker.log({k: v for k, v in log.items() if isinstance(v, (int, float))}, iteration)
            self.say(iteration_line(log, self.report))
        if stopping:
            self.say(f"stopped by {STOP_REQUESTED[0]} after iteration {iteration}; continue with the same command "
                     f"plus --resume auto")
            self.tracker.close()
            release_run_directory(self.dir)
        return stopping

    def finish(self, transformer):
        """After the last iteration (rank 0): save theta's LoRA, the reward curve and the diagnostics, print the
        time split."""
        if self.rank == 0:
            save_lora(transformer, os.path.join(self.dir, "lora"))
            plot_rewards(self.metrics, os.path.join(self.dir, "reward_curve.png"), self.report)
            plot_diagnostics(self.metrics, os.path.join(self.dir, "diagnostics.png"), self.report)
            self.say(time_split_line(self.metrics, self.cfg))
            self.say(f"done: LoRA in {self.dir}/lora, curve in {self.dir}/reward_curve.png, metrics in "
                     f"{self.metrics_path}")
        self.tracker.close()
        release_run_directory(self.dir)


# -- console lines ------------------------------------------------------------------------------------------------
def reward_line(cfg, rewards):
    """The run's first line: the reward, how the OCR rewards read (and whether EasyOCR's recogniser is quantised),
    the unseen metrics. rewards: a Rewards."""
    names = [n for n, _ in rewards.trained] + rewards.unseen
    ocr = {name: rewards.options.get(name, {}) for name in reward.OCR_REWARDS if name in names}
    how = {True: "text detection + recognition", False: "the recogniser on the whole image, no detection"}
    readings = ", ".join(f"{name} by {how[bool(o.get('detect_text'))]}" for name, o in ocr.items())
    if "ocr" in ocr:
        quantized = ocr["ocr"].get("quantize", True)
        readings += (f"; EasyOCR's recogniser {'int8-quantised on a CPU' if quantized else 'fp32'} "
                     f"(ocr.quantize={str(quantized).lower()})")
    return (f"reward {cfg.reward}{f' (OCR read {readings})' if ocr else ''}; unseen metrics at evaluation: "
            f"{', '.join(rewards.unseen) or 'none'}")


def iteration_line(log, report):
    """One iteration's console line from its log: the Report's fields, then the iteration's time."""
    parts = []
    for label, key, spec, separator in [("it", "iteration", "3d", " | ")] + report.console:
        parts.append(f"{label} {format(log.get(key, math.nan), spec)}{separator or ' '}")
    return "".join(parts) + f"{log['time/iteration']:.1f}s"


def evaluation_line(result, cfg):
    """A held-out evaluation's scores (`evaluate`'s dict) in one line."""
    return (f"held-out {cfg.reward} reward {result['reward']:.4f} (exact {result['exact']:.3f}, {result['n']} "
            f"prompts)" + "".join(f", unseen {k} {v:.4f}" for k, v in result["unseen"].items())
            + (f"; {result['note']}" if result.get("note") else ""))


def evaluation_only_lines(result, cfg, grid_path):
    """--eval's lines: the scores with the sampling settings, then one line per GenEval tag and their mean."""
    yield (f"held-out {cfg.reward} reward {result['reward']:.4f}, exact {result['exact']:.4f} on {result['n']} "
           f"prompts (CFG {cfg.eval_guidance_scale}, {cfg.eval_num_steps} steps)"
           + "".join(f", {k} {v:.4f}" for k, v in result["per_image"].items())
           + "".join(f", unseen {k} {v:.4f}" for k, v in result["unseen"].items()) + f"; grid in {grid_path}")
    for tag, values in result["per_tag"].items():
        yield f"  {tag:14s} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
    if result["tag_mean"]:
        yield f"  {'mean of tags':14s} " + "  ".join(f"{k} {v:.4f}" for k, v in result["tag_mean"].items())


def time_split_line(metrics, cfg):
    """Where the run's time went, from the time/* entries of its metrics."""
    totals = {k: sum(m.get(f"time/{k}", 0.0) for m in metrics) for k in TIME_PARTS}
    return ("time split: " + ", ".join(f"{k} {v / max(sum(totals.values()), 1e-9):.1%}" for k, v in totals.items())
            + f" of {sum(totals.values()):.0f}s (sample = rollouts + VAE decode, reward = {cfg.reward}, "
            "train = forward/backward/optimizer, other = EMA, grids, checkpoints, logging)")


def evaluation_due(iteration, first, eval_every):
    """A held-out evaluation before this iteration? Before the first iteration of a fresh run, then every
    eval_every iterations (0: never in between); a resumed run does not repeat the one at the iteration it starts
    from. main() also evaluates after the last iteration."""
    return iteration == first == 0 or bool(eval_every and iteration % eval_every == 0 and iteration != first)


def make_rewards(rewards, device, rank=0):
    """(the trained reward's function, {name: function} of the unseen metrics, built on rank 0 only), from
    reward.make_reward with the Rewards' options. Raises InputError for a reward that cannot be built
    (reward.RewardError)."""
    try:
        reward_fn = reward.make_reward(rewards.trained, device, rewards.options)
        return reward_fn, {name: reward.make_reward(name, device, rewards.options)
                           for name in rewards.unseen if rank == 0}
    except reward.RewardError as error:
        raise InputError(str(error)) from None


# -- evaluation --------------------------------------------------------------------------------------------------
def caption(prompt, length=12):
    """The first `length` characters of a prompt's text (a JSON metadata line gives its "prompt")."""
    return reward.prompt_text(prompt).strip()[:length]


def image_grid(images, captions, columns=8, caption_height=12):
    """Tile PIL images into one captioned grid image ("prompt | reward" under each picture)."""
    width, height = images[0].size
    cell_width = max(width, 96)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_width, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_width, (i // columns) * (height + caption_height)
        grid.paste(image, (x, y))
        draw.text((x + 1, y + height), caption[: cell_width // 6], fill="black")
    return grid


@torch.no_grad()
def evaluate(images_for, reward_fn, prompts, batch_size=64, seed=0, grid_size=32, unseen=None):
    """Score a model on a prompt set; `images_for(prompts, seeds)` returns one PIL image per prompt (`generate` with
    the model bound).

    Samples one image per prompt with seeds seed, seed+1, ... (the same noise for every model compared), scores
    them with `reward_fn` and returns dict(reward=mean in [0, 1], exact=fraction scoring 1.0, n=len(prompts),
    rewards=Tensor (N,), grid=captioned PIL grid of the first `grid_size` samples, two reward-hacking signs:
    pixel_std=mean over images of the grey-level std in [0, 1], blank=fraction of images with that std < 0.02),
    unseen={name: mean reward} for the rewards of `unseen` ({name: reward fn}, scored on the same images) and
    unseen_rewards={name: Tensor (N,)},
    per_image={key: mean} for per-image info of the reward (e.g. GenEval's binary geneval/correct), and, when the
    prompts carry a GenEval "tag", per_tag={tag: {"reward": mean, key: mean, ...}} and tag_mean={same keys: mean
    over the tags} (GenEval's overall score is the mean over its six tags of geneval/correct).
    """

    rewards, images, pixel_stds, per_image = [], [], [], collections.defaultdict(list)
    unseen_rewards = {name: [] for name in (unseen or {})}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        batch_images = images_for(batch, range(seed + start, seed + start + len(batch)))
        batch_rewards, info = reward_fn(batch_images, batch)
        rewards.append(batch_rewards)
        for key, value in info.items():
            if torch.is_tensor(value) and value.shape == batch_rewards.shape:
                per_image[key].append(value.float())
        for name, fn in (unseen or {}).items():
            unseen_rewards[name].append(fn(batch_images, batch)[0])
        pixel_stds += [float(np.asarray(im.convert("L"), dtype=np.float32).std() / 255) for im in batch_images]
        images += batch_images[: max(grid_size - len(images), 0)]
    rewards = torch.cat(rewards)
    values = {"reward": rewards} | {key: torch.cat(parts) for key, parts in per_image.items()}
    tags = [reward.prompt_tag(p) for p in prompts]
    per_tag = {tag: {key: float(v[[t == tag for t in tags]].mean()) for key, v in values.items()}
               for tag in sorted({t for t in tags if t is not None})}
    captions = [f"{caption(p)}|{r:.2f}" for p, r in zip(prompts, rewards.tolist())]
    return {"reward": float(rewards.mean()), "exact": float((rewards == 1.0).float().mean()), "n": len(prompts),
            "pixel_std": float(np.mean(pixel_stds)), "blank": float(np.mean(np.array(pixel_stds) < 0.02)),
            "unseen": {name: float(torch.cat(parts).mean()) for name, parts in unseen_rewards.items()},
            "per_image": {key: float(v.mean()) for key, v in values.items() if key != "reward"},
            "per_tag": per_tag, "tag_mean": {key: float(np.mean([t[key] for t in per_tag.values()]))
                                             for key in values} if per_tag else {},
            "rewards": rewards, "unseen_rewards": {name: torch.cat(parts) for name, parts in unseen_rewards.items()},
            "grid": image_grid(images, captions[: len(images)])}


# -- checkpoints -------------------------------------------------------------------------------------------------
RESUMABLE_CHANGES = {"iterations", "resume", "eval_every", "eval_count", "eval_start", "eval_rewards", "sample_every",
                     "device", "output_dir", "run_name", "log_to", "overwrite", "implicit_check_prompts"}
# the fields a resumed run may change (they leave the computation as it is)


class NonFiniteWeights(FloatingPointError):
    """The LoRA weights became inf or nan (e.g. a learning rate too large); they are never saved."""


def check_finite(value, what, state):
    """`value` (a scalar tensor) if it is finite; else FloatingPointError naming `what` and state's iteration and
    optimizer step (the run stops; its last checkpoint is the state before the iteration)."""
    if not bool(torch.isfinite(value)):
        raise FloatingPointError(f"non-finite {what} {value.item()} at iteration {state['iteration']}, optimizer "
                                 f"step {state['step']}")
    return value


def check_finite_weights(params, iteration, state):
    """Raise NonFiniteWeights naming the adapter, the iteration and the optimizer step if a LoRA weight of
    `params` ({adapter: tensors}) is not finite (before anything of that iteration is saved)."""
    for name, tensors in params.items():
        if not all(bool(torch.isfinite(p).all()) for p in tensors):
            raise NonFiniteWeights(f"non-finite LoRA weights of {name} after iteration {iteration}, optimizer step "
                                   f"{state['step']} (not saved)")


def save_checkpoint(path, cfg, params, optimizer, state):
    """Write one dict (LoRA weights of theta / old / sampler, optimizer, config, counters) atomically. A write that
    fails (disk full, a file-size limit) removes its .tmp and raises InputError; the previous checkpoint stays."""
    checkpoint = {"config": dataclasses.asdict(cfg), "state": dict(state), "optimizer": optimizer.state_dict(),
                  "lora": {name: [p.detach().cpu().clone() for p in ps] for name, ps in params.items()}}
    try:
        torch.save(checkpoint, path + ".tmp")
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        if not isinstance(error, (OSError, RuntimeError)):
            raise
        raise InputError(f"cannot write the checkpoint {path} ({str(error).strip().splitlines()[0][:160]}); the "
                         f"previous one is intact: free disk space or raise the file-size limit, then continue with "
                         f"--resume auto") from None
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous checkpoint intact


CHECKPOINT_KEYS = {"config", "state", "optimizer", "lora"}


def read_checkpoint(path, cfg):
    """What save_checkpoint wrote at `path` (tensors, numbers, strings, lists and dicts only: `weights_only=True`,
    so a checkpoint carrying pickled code is refused, not run; memory-mapped), checked against `cfg` before any
    model loads. Raises InputError naming the file if it is corrupt, truncated or not a CRD checkpoint, naming the
    Config fields that changed the algorithm, or if it is already at or past --iterations."""
    try:  # memory-mapped: the tensors are read only where they are used (torch.save's zip format only)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # truncated, foreign, or carrying objects other than tensors and plain data
        detail = str(error).strip().splitlines()[0].split(". ")[0][:160] if str(error).strip() else ""
        raise InputError(f"--resume {path}: not a readable CRD checkpoint ({type(error).__name__}: {detail}); pass "
                         f"a checkpoint.pt written by crd.py") from None
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= set(checkpoint) or not isinstance(
            checkpoint["config"], dict) or not isinstance(checkpoint["state"], dict):
        raise InputError(f"--resume {path}: not a CRD checkpoint (expected the keys {sorted(CHECKPOINT_KEYS)})")
    changed = [f"{k}: {v!r} -> {getattr(cfg, k)!r}" for k, v in checkpoint["config"].items()
               if k not in RESUMABLE_CHANGES and getattr(cfg, k, v) != v]
    if changed:
        raise InputError(f"cannot resume {path}: these settings differ from the checkpoint's: {'; '.join(changed)}")
    done = checkpoint["state"].get("iteration", 0)
    if done >= cfg.iterations:
        raise InputError(f"--resume {path}: the checkpoint is at iteration {done}, already at or past --iterations "
                         f"{cfg.iterations}; nothing to train: pass --iterations N with N > {done} to continue it")
    return checkpoint


def load_checkpoint(path, cfg, params, optimizer):
    """Restore what save_checkpoint wrote (`read_checkpoint`) into the LoRA weights `params` and the optimizer;
    returns the counters. Raises InputError as read_checkpoint does, or if its tensors do not fit `params`."""
    checkpoint = read_checkpoint(path, cfg)
    shapes = {name: [tuple(t.shape) for t in checkpoint["lora"].get(name, [])] for name in params}
    if shapes != {name: [tuple(p.shape) for p in ps] for name, ps in params.items()}:
        raise InputError(f"--resume {path}: its LoRA tensors do not fit this model's adapters; resume with the "
                         f"--model and LoRA settings it was written with")
    with torch.no_grad():
        for name, tensors in checkpoint["lora"].items():
            for p, t in zip(params[name], tensors):
                p.copy_(t)
    optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint["state"]


def save_lora(transformer, directory):
    """Save the theta adapter so that `StableDiffusion3Pipeline.load_lora_weights(directory)` loads it."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, adapter_name="theta")
    metadata = transformer.peft_config["theta"].to_dict()  # NOTE: carries lora_alpha; without it, scale 1 not alpha/r
    StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=layers,
                                               transformer_lora_adapter_metadata=metadata)


# -- curves and live logging -------------------------------------------------------------------------------------
def plot_rewards(metrics, path, report):
    """Reward curve: training reward per iteration and held-out evaluation reward, saved as PNG; beside it, if logged,
    the held-out diagnostic of report.held_out_panel (keys eval/diag/*NAME*, with their *_se* errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, ylabel, title = report.held_out_panel
    accuracy_keys = sorted({k for m in metrics for k in m if k.startswith("eval/diag/") and name in k
                            and f"{name}_se" not in k})
    fig, axes = plt.subplots(1, 2 if accuracy_keys else 1, figsize=(11 if accuracy_keys else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    train = [(m["iteration"], m["reward/mean"]) for m in metrics if "reward/mean" in m]
    held_out = [(m["eval/iteration"], m["eval/reward"]) for m in metrics if "eval/reward" in m]
    if train:
        ax.plot(*zip(*train), label="training rollouts (sampler)", alpha=0.6)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out prompts (theta, no CFG)")
    eval_keys = {"eval/reward", "eval/exact", "eval/iteration", "eval/pixel_std", "eval/blank"}
    for key in sorted({k for m in metrics for k in m if k.startswith("eval/") and k not in eval_keys
                       and "/" not in k[5:]}):  # eval/<name>: an unseen metric
        ax.plot(*zip(*[(m["eval/iteration"], m[key]) for m in metrics if key in m]), "s--",
                label=f"held-out, unseen metric {key[5:]}")
    ax.set(xlabel="iteration", ylabel="reward", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    for key in accuracy_keys:  # with +-1 standard error (the key + "_se", where logged)
        points = [(m["eval/iteration"], m[key], m.get(key.replace(name, f"{name}_se"), 0)) for m in metrics
                  if key in m]
        iterations, values, errors = zip(*points)
        axes[0, 1].errorbar(iterations, values, yerr=errors, marker="o", capsize=2, label=key[len("eval/diag/"):])
    if accuracy_keys:
        axes[0, 1].axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
        axes[0, 1].set(xlabel="iteration", ylabel=ylabel, title=title)
        axes[0, 1].grid(alpha=0.3)
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_diagnostics(metrics, path, report, window=10):
    """The algorithm's per-iteration diagnostics, saved as PNG: one panel per entry of report.panels (its keys
    against the iteration, with the given y scale), the report.smoothed keys also as a running mean over `window`
    iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [m["iteration"] for m in metrics]
    columns = math.ceil(len(report.panels) / 2)
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 6), squeeze=False)
    for ax, (keys, title, scale) in zip(axes.T.flatten(), report.panels):
        for key in keys:
            values = np.array([m.get(key, math.nan) for m in metrics], dtype=float)
            ax.plot(its, values, alpha=0.5, label=key)
            if key in report.smoothed and len(values) >= window:
                smooth = np.convolve(np.nan_to_num(values), np.ones(window) / window, mode="valid")
                ax.plot(its[window - 1:], smooth, "k-" if key == report.smoothed[0] else "r-",
                        label=f"{key}, running mean of {window}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=title, xlabel="iteration", yscale=scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Tracker:
    """Live curves for --log-to tensorboard|wandb: one TensorBoard writer (runs/<run_name>/tensorboard) with the keys
    of metrics.jsonl and the held-out grids, per iteration; with wandb, wandb.init(sync_tensorboard=True) mirrors it
    to a wandb run (WANDB_MODE=offline works offline), as CleanRL does. kind '' (or a rank other than 0) makes every
    call a no-op; metrics.jsonl stays the record either way.
    """

    def __init__(self, kind, run_dir, cfg):
        self.kind, self.writer = kind, None
        if kind == "wandb":  # before the writer, so that wandb patches it
            import wandb

            wandb.init(project="crd", name=cfg.run_name, dir=run_dir, config=dataclasses.asdict(cfg),
                       sync_tensorboard=True)
        if kind:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, values, step, images=None):
        """values: {key: number}; images: {key: PIL image}."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            for key, image in (images or {}).items():
                self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            if self.kind == "wandb":
                import wandb

                wandb.finish()
            self.writer = None


# -- distributed (torchrun): whole prompt groups per rank, rewards gathered before Eq. (6), gradients averaged ---
def setup_distributed():
    """(rank, world_size, local_rank) from torchrun's environment; a plain `python crd.py` is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), world_size, local_rank


def all_gather(x, world_size):
    """Concatenate a (n,) tensor from every rank, in rank order -> (world_size * n,)."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(parameters, world_size):
    """What DDP does at backward: average the gradients over ranks (done by hand because the three LoRA adapters
    switch requires_grad on and off, which DDP's reducer does not allow)."""
    if world_size == 1:
        return
    for p in parameters:
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


def barrier(world_size):
    """Wait for every rank (no-op in a single process)."""
    if world_size > 1:
        dist.barrier()


# -- seeds: every draw of iteration i from generators seeded by (seed, i), so a resume repeats a straight run ----------
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


# -- signals -----------------------------------------------------------------------------------------------------
STOP_REQUESTED = []  # filled by the SIGINT / SIGTERM handler; RunDirectory.end_iteration checks it


def install_stop_handlers():
    """Ctrl-C / SIGTERM: let the current iteration finish, write a checkpoint, exit; a second signal stops at once."""
    def request_stop(signum, frame):
        STOP_REQUESTED.append(signal.Signals(signum).name)
        if len(STOP_REQUESTED) > 1:
            raise KeyboardInterrupt
        print(f"\n{STOP_REQUESTED[0]}: stopping after this iteration (send it again to stop now)", flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)


# -- the pipeline: loading, text embeddings, Euler sampling, decoding --------------------------------------------------
def load_pipeline(model, dtype=torch.float32, device="cpu"):
    """Load a `StableDiffusion3Pipeline` from a local directory or a hub id (e.g. the embedded tiny model).

    Raises InputError if `model` looks like a local path but holds no `model_index.json`, or cannot be loaded
    (a hub id with no network, or one not in the local cache with HF_HUB_OFFLINE=1).
    """
    from diffusers import StableDiffusion3Pipeline

    check_model(model)
    absent = {}  # components saved as [null, null] (the tiny model has no T5) must be passed as None
    index = os.path.join(model, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            absent = {k: None for k, v in json.load(f).items() if isinstance(v, list) and v[0] is None}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype, **absent)
    except OSError as error:  # the hub could not be reached, or a file is missing
        raise InputError(f"cannot load --model {model!r} ({str(error).splitlines()[0]}). A hub id needs the network "
                         f"and, for SD3.5-M, a login; with HF_HUB_OFFLINE=1 only models already in the local cache "
                         f"load. Or pass a local folder written by save_pretrained.") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_frozen_pipeline(cfg, device):
    """`load_pipeline(cfg.model)` in bf16 or fp32 (--mixed-precision) with the VAE and the text encoders frozen; with
    --text-encoders-on-cpu the text encoders stay on the CPU (`encode_prompts` moves their output)."""
    pipe = load_pipeline(cfg.model, torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32, device)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False)
            if cfg.text_encoders_on_cpu and module is not pipe.vae:
                module.to("cpu")
    return pipe


def encode_prompts(pipe, prompts, max_sequence_length, cache=None):
    """Text-encode prompts with the pipeline's own encoders (which may live on the CPU, see text_encoders_on_cpu).

    prompts: plain strings, or JSON metadata lines (GenEval's format) whose "prompt" field is encoded. Returns
    prompt_embeds (N, L, D) and pooled_prompt_embeds (N, D_pool), on the transformer's device. With a `cache` (a
    PromptCache) each distinct prompt is encoded once, on its own, and served from the CPU afterwards.
    """
    if cache is not None:
        return cache(pipe, prompts, max_sequence_length)
    device = pipe.text_encoder.device
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=[reward.prompt_text(p) for p in prompts], prompt_2=None,
                                              prompt_3=None, do_classifier_free_guidance=False, device=device,
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
             prompt_cache=None, schedule="diffusers"):
    """Prompts -> PIL images (the held-out evaluation's sampler): text-encode, sample (Euler ODE, one seed per
    prompt), decode, with the transformer's adapters as they are. Returns len(prompts) images."""
    embeds, pooled = encode_prompts(pipe, prompts, max_sequence_length, prompt_cache)
    return decode_latents(pipe, sample_latents(pipe, embeds, pooled, seeds, height, width, num_steps, guidance_scale,
                                               max_sequence_length, schedule))


# -- input checks: everything checked before loading a model -----------------------------------------------------
RANGES = {"> 0": lambda v: math.isfinite(v) and v > 0, ">= 0": lambda v: math.isfinite(v) and v >= 0,
          "[0, 1)": lambda v: 0 <= v < 1, "[0, 1]": lambda v: 0 <= v <= 1,
          "(0, 1]": lambda v: 0 < v <= 1}  # the range annotations of crd.Config's fields; inf and nan fail each


def check_config(cfg, world_size=1):
    """Raise InputError naming the field and the fix for impossible settings of `cfg` (a crd.Config), before any
    expensive work: each field's range or choices from its type annotation (Annotated, Literal), then the sizes
    Algorithm 1 needs (`cfg.check`)."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            choices = ", ".join(choice or repr(choice) for choice in typing.get_args(hint))
            raise InputError(f"{flag} {value!r}: choose one of {choices}")
        rule = getattr(hint, "__metadata__", (None,))[0]
        if rule is not None and not RANGES[rule](value):
            finite = "" if math.isfinite(value) else "a finite number "
            raise InputError(f"{flag} {value} must be {finite}{'in ' + rule if rule[0] in '[(' else rule}")
    cfg.check(world_size)


DEVICE_TYPES = {"cpu": lambda: True, "cuda": lambda: torch.cuda.is_available(),
                "mps": lambda: torch.backends.mps.is_available()}  # the --device types CRD runs on, and their test


def pick_device(name, local_rank=0, world_size=1):
    """'auto' -> cuda if available, else mps, else cpu; any other name is passed to torch.device. Under torchrun
    on GPUs each process takes cuda:<local_rank>. Raises InputError for a name torch does not know, a device type
    not in DEVICE_TYPES (meta, hpu, ...), or a device torch cannot find here (before any model loads)."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise InputError(f"--device {name!r}: {error}; use auto, cpu, cuda or cuda:N") from None
        if device.type not in DEVICE_TYPES:
            raise InputError(f"--device {name}: CRD runs on cpu, cuda or mps devices ({device.type} "
                             f"{'holds no data' if device.type == 'meta' else 'is not supported'}); use auto, cpu, "
                             f"cuda or cuda:N")
        available = DEVICE_TYPES[device.type]
        if not available():
            raise InputError(f"--device {name}: torch finds no {device.type.upper()} device here (torch "
                             f"{torch.__version__}); use --device cpu, or auto to take the best one there is")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device("cuda", local_rank) if device.type == "cuda" and world_size > 1 else device


def read_prompts(path):
    """Read one prompt per non-empty line, UTF-8 with a leading byte-order mark dropped (utf-8-sig). Raises InputError
    (missing, not UTF-8 or empty file) with the path."""
    if not path:
        raise InputError("no prompt file: pass --prompts FILE, one training prompt per line (the paper's OCR "
                         "training prompts are Flow-GRPO's dataset/ocr/train.txt, MIT, not shipped here; "
                         "data/ocr_test.txt is for evaluation only)")
    if not os.path.isfile(path):
        raise InputError(f"prompt file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM would otherwise start prompt 1
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise InputError(f"prompt file {path!r} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    if not prompts:
        raise InputError(f"prompt file {path!r} holds no prompts (one prompt per line expected)")
    return prompts


def check_model(model, missing_hint=""):
    """Raise InputError if `model` looks like a local path but is not a saved diffusers pipeline; `missing_hint`, if
    given, says how to make that model when its folder does not exist."""
    looks_local = os.path.isdir(model) or model.startswith((".", "/", "~")) or model.count("/") != 1  # hub: org/name
    if looks_local and not os.path.isfile(os.path.join(model, "model_index.json")):
        if missing_hint and not os.path.exists(model):
            raise InputError(f"the model {model} is missing: {missing_hint}, or pass --model")
        raise InputError(f"--model {model!r} is not a diffusers pipeline directory (no model_index.json). "
                         f"Pass the folder written by save_pretrained, e.g. assets/tiny-sd3-text, or a hub id.")


def check_lora(folder):
    """Raise InputError unless `folder` holds a readable pytorch_lora_weights.safetensors with transformer weights
    (what a run's lora/ has)."""
    path = os.path.join(folder, "pytorch_lora_weights.safetensors")
    if not os.path.isfile(path):
        raise InputError(f"--lora {folder!r}: no pytorch_lora_weights.safetensors there; pass the lora/ folder a run "
                         f"wrote (runs/NAME/lora)")
    try:
        keys = list(safetensors.torch.load_file(path))
    except Exception as error:  # safetensors raises its own error type for a bad header or a truncated file
        raise InputError(f"--lora: {path} is not a readable safetensors file ({str(error).splitlines()[0]}); "
                         f"copy it again, or retrain") from None
    if not any(key.startswith("transformer.") for key in keys):
        raise InputError(f"--lora: {path} holds no transformer LoRA weights (keys such as {keys[:1]}); pass the lora/ "
                         f"folder of a run on this model")


def check_lora_targets(targets, layer_names):
    """Raise InputError unless every comma-separated name of --lora-targets ends (at a '.') one of `layer_names`,
    the transformer's modules that hold weights (peft's rule for target_modules); a name matching none is a typo."""
    wanted = targets.split(",")
    unmatched = [t for t in wanted if not t.strip() or not any(n == t or n.endswith("." + t) for n in layer_names)]
    if unmatched:
        raise InputError(f"--lora-targets {targets!r}: {', '.join(map(repr, unmatched))} matches no layer of the "
                         f"transformer; pass comma-separated layer names such as attn.to_q,attn.to_k (the default "
                         f"is every joint-attention projection)")


def local_layer_names(model):
    """The names of the transformer's modules that hold weights, read from a local pipeline's safetensors header
    (no weights load); None for a hub id or another format."""
    from safetensors import safe_open

    folder = os.path.join(model, "transformer")
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    try:
        if os.path.isfile(index):
            with open(index) as f:
                keys = json.load(f)["weight_map"]
        else:
            with safe_open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "pt") as f:
                keys = list(f.keys())
    except (OSError, KeyError, ValueError):
        return None
    return {key.rsplit(".", 1)[0] for key in keys}


def load_lora(pipe, folder):
    """pipe.load_lora_weights(folder), refusing (InputError) a LoRA that does not fit the model or of which no layer
    loads (diffusers then only warns, and the base model would be scored as the LoRA)."""
    try:
        pipe.load_lora_weights(folder)
    except (ValueError, RuntimeError, KeyError, IndexError) as error:  # peft: no such layer; torch: other shapes;
        detail = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}"
        raise InputError(f"--lora {folder}: cannot load it into --model ({detail}); pass the lora/ folder of a run "
                         f"on this model") from None  # diffusers: LoRA keys without their pairs
    if not any(pipe.get_list_adapters().values()):
        raise InputError(f"--lora {folder}: none of its weights fits a layer of --model (no transformer LoRA keys "
                         f"loaded); pass the lora/ folder of a run on this model")


def image_multiple(model):
    """The multiple of pixels an SD3 image side must be: VAE downsampling x transformer patch size, read from a
    local pipeline's configs (the tiny models: 2 x 4 = 8), or 16 for a hub id (SD3 / SD3.5: 8 x 2)."""
    try:
        with open(os.path.join(model, "vae", "config.json")) as f:
            vae_factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        with open(os.path.join(model, "transformer", "config.json")) as f:
            return vae_factor * json.load(f)["patch_size"]
    except (OSError, KeyError, ValueError):
        return 16


def check_image_size(cfg):
    """Raise InputError if --height or --width is not a multiple of `image_multiple(cfg.model)`."""
    multiple = image_multiple(cfg.model)
    for flag, value in (("--height", cfg.height), ("--width", cfg.width)):
        if value % multiple:
            raise InputError(f"{flag} {value} is not a multiple of {multiple} (this model's VAE factor x patch "
                             f"size); use {max(multiple, value // multiple * multiple)}")


def check_output_dir(path):
    """Create the run directory `path`; raise InputError if it cannot be created or written (a file in the way, no
    permission, a file system that refuses)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"cannot create the run directory {path!r}: {existing!r} is a file; change --output-dir or "
                         f"--run-name")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the run directory {path!r}: no write permission in {existing!r}; change "
                         f"--output-dir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:  # e.g. under /proc, or a read-only file system
        raise InputError(f"cannot create the run directory {path!r} ({error.strerror}); change --output-dir") \
            from None


def parse_rewards(cfg):
    """The Rewards of --reward, --eval-rewards, --reward-options and --ocr-detection (the OCR rewards' detect_text
    option), each parsed once; InputError naming the flag for a reward or an option that does not exist, and for
    ocr.model_dir without EasyOCR's weights."""
    unseen = [name for name in cfg.eval_rewards.split(",") if name]
    terms = {}
    for flag, spec in [("--reward", cfg.reward)] + [("--eval-rewards", name) for name in unseen]:
        try:
            terms[spec] = reward.parse_reward_spec(spec)
        except ValueError as error:
            raise InputError(f"{flag} {spec!r}: {error}") from None
    try:
        options = reward.parse_reward_options(cfg.reward_options, cfg.ocr_detection)
        reward.check_reward_options(options)
    except ValueError as error:
        raise InputError(f"--reward-options: {error}") from None
    return Rewards(terms[cfg.reward], unseen, options)


def check_inputs(cfg, world_size=1, training=True, lora="", model_hint=""):
    """Everything that can be checked before loading a model; raises InputError saying what is wrong and how to fix it.

    Returns (training prompts, held-out prompts, Rewards: the reward flags parsed); training=False (--eval) needs no
    training prompts. model_hint:
    how to make --model if its folder is missing (see check_model). Prints the prompts' warnings (ambiguous OCR
    quotes) to stderr, one line each.
    """
    check_config(cfg, world_size)
    check_model(cfg.model, model_hint)
    rewards = parse_rewards(cfg)
    if cfg.log_to and importlib.util.find_spec(cfg.log_to) is None:
        raise InputError(f"--log-to {cfg.log_to} needs the {cfg.log_to} package: pip install {cfg.log_to}")
    if lora:
        check_lora(lora)
    check_image_size(cfg)
    layer_names = local_layer_names(cfg.model) if training else None
    if layer_names is not None:
        check_lora_targets(cfg.lora_targets, layer_names)
    check_output_dir(os.path.join(cfg.output_dir, cfg.run_name))
    resume = os.path.join(cfg.output_dir, cfg.run_name, "checkpoint.pt") if cfg.resume == "auto" else cfg.resume
    if training and resume and cfg.overwrite:
        raise InputError("--resume continues a run and --overwrite replaces it: pass one of them")
    if training and resume and not os.path.isfile(resume):
        raise InputError(f"--resume {resume!r}: no such checkpoint")
    if training and resume:
        read_checkpoint(resume, cfg)  # readable, a CRD checkpoint, the same algorithm, iterations left
    prompts = read_prompts(cfg.prompts)[: cfg.max_prompts or None] if training else []
    eval_prompts = read_prompts(cfg.eval_prompts)[cfg.eval_start: cfg.eval_start + cfg.eval_count]
    if not eval_prompts:
        raise InputError(f"--eval-start {cfg.eval_start} is past the end of {cfg.eval_prompts}")
    for path, items, specs, start in ((cfg.prompts, prompts, [rewards.trained], 1),
                                      (cfg.eval_prompts, eval_prompts, [rewards.trained] + rewards.unseen,
                                       cfg.eval_start + 1)):
        said = set()
        for spec in specs:  # each reward says what it needs of a prompt (a quoted OCR target, GenEval metadata)
            try:
                for warning in reward.check_prompts(spec, items, start):
                    if warning not in said:
                        print(f"warning: {path}: {warning}", file=sys.stderr)
                        said.add(warning)
            except ValueError as error:
                raise InputError(f"{path}: {error}") from None
    if training and len(prompts) < cfg.prompts_per_iteration:
        raise InputError(f"{cfg.prompts} holds {len(prompts)} prompts, fewer than --prompts-per-iteration "
                         f"{cfg.prompts_per_iteration}")
    return prompts, eval_prompts, rewards


# -- command line ------------------------------------------------------------------------------------------------
def parse_args(config_class, presets, argv=None, description=""):
    """(config, the other arguments) from the command line: --preset picks the defaults (`presets`: {name: function
    returning a config}, the first is the default), every field of the dataclass `config_class` is a --flag, its
    help text the field's metadata["help"]."""
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default=next(iter(presets)), choices=sorted(presets))
    preset, _ = preset_parser.parse_known_args(argv)
    defaults = presets[preset.preset]()
    hints = typing.get_type_hints(config_class)
    parser = argparse.ArgumentParser(description=description, parents=[preset_parser])
    parser.add_argument("--eval", action="store_true", help="only evaluate --model (+ --lora) on --eval-prompts")
    parser.add_argument("--lora", default="", help="with --eval: a LoRA folder saved by a run (runs/NAME/lora)")
    parser.add_argument("--verbose", action="store_true", help="show every library warning and progress bar")
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors (also CRD_DEBUG=1)")
    for f in dataclasses.fields(config_class):
        value, flag = getattr(defaults, f.name), "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if typing.get_origin(hints[f.name]) is typing.Literal:
            text += f" (one of: {', '.join(choice or repr(choice) for choice in typing.get_args(hints[f.name]))})"
        if isinstance(value, bool):
            parser.add_argument(flag, default=value, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, default=value, type=type(value),
                                help=f"{text} (default: {str(value).replace('%', '%%')})")
    args = parser.parse_args(argv)
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}), args


def quiet_known_warnings():
    """Silence, at their source, the library messages a user cannot act on (a run still prints tqdm and one line per
    iteration); --verbose keeps them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", module="peft")  # 3 adapters
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)  # EasyOCR's LSTM
    warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)  # EasyOCR's loader on a CPU
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def last_good_state(checkpoint):
    """What a diverged run's error adds: the checkpoint it can resume from, with its iteration, or that none was
    written."""
    if not os.path.isfile(checkpoint):
        return "no checkpoint was written before it: change the settings and start again"
    try:
        iteration = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["state"]["iteration"]
    except Exception:
        iteration = "?"
    return (f"the last good state is {checkpoint}, at iteration {iteration} (resume with --resume auto, with other "
            f"settings, e.g. a smaller --learning-rate)")


def cli(train, evaluate_model, config_class, presets, argv=None, description=""):
    """`python crd.py ...`: parse the flags (see parse_args) and run `train(config)`, or `evaluate_model(config, lora)`
    with --eval. Input mistakes (InputError) and a diverged run (FloatingPointError) print one line and return exit
    status 2; --debug (or CRD_DEBUG=1) shows their traceback. Bugs always keep theirs. A run stopped by SIGINT /
    SIGTERM (after its checkpoint, or at once by a second signal) returns 128 + the signal's number (130 / 143)."""
    argv = sys.argv[1:] if argv is None else argv
    config, args = parse_args(config_class, presets, argv, description)
    if not args.verbose:
        quiet_known_warnings()
    install_stop_handlers()
    try:
        evaluate_model(config, args.lora) if args.eval else train(config)
    except (InputError, FloatingPointError) as error:
        if args.debug or os.environ.get("CRD_DEBUG"):
            raise
        if isinstance(error, FloatingPointError):  # a diverged run: say where its last good state is
            checkpoint = os.path.join(config.output_dir, config.run_name, "checkpoint.pt")
            error = f"{error}; {last_good_state(checkpoint)}"
        print(f"crd.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second signal: stopped at once, without a new checkpoint
        name = STOP_REQUESTED[-1] if STOP_REQUESTED else "SIGINT"
        print(f"crd.py: stopped at once by {name}; the last checkpoint is in "
              f"{os.path.join(config.output_dir, config.run_name)} (--resume auto)", file=sys.stderr)
        return 128 + signal.Signals[name]
    if STOP_REQUESTED and not args.eval:
        return 128 + signal.Signals[STOP_REQUESTED[0]]
    return 0


