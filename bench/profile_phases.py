"""Where the default job's time goes, phase by phase, against the machine's own fp32 matmul rate.

    python bench/profile_phases.py           # the default job (`python crd.py --reward ocr`), 3 timed iterations
    python bench/profile_phases.py --threads 1 --iterations 1 --eval-count 64       # a quick look

Runs `crd.main` on the default job (the tiny_ocr preset: the embedded tiny SD3 model, 64 images per iteration, the
EasyOCR reward, held-out evaluations scored by EasyOCR and PP-OCR) for 1 + --iterations iterations, with crd's
functions wrapped from the outside (neither crd.py nor the run's training changes). Iteration 0 and the
evaluation before it (on its first batch of 64 prompts, the FLOPs scaled to the whole evaluation) run under torch's
FlopCounterMode, which counts each phase's FLOPs (matmuls, convolutions,
attention, EasyOCR's int8 LSTM and linear layers; PP-OCR runs in ONNX Runtime, out of its sight); the iterations
after it, and the evaluation after the last one, are timed without the counter. Each phase's time is exclusive: the
transformer forwards inside a loss are the forwards' rows, not the loss's.

Prints a Markdown table: per phase, seconds per iteration (an evaluation's seconds are spread over the default
job's 150 iterations as its 7 evaluations are), share, GFLOP per iteration, achieved GFLOP/s, its fraction of the
fp32 matmul rate measured in the same run (torch.matmul of 2048 x 2048 matrices at the same thread count, best of
several, before and after the job), and the CPU seconds the process used per wall second (2.00: two cores busy
throughout; less: a serial phase, or other processes on the machine); and the matmul rate at the tiny
transformer's own shapes and the load average (other processes) before and after.
"""
import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.optim import optimizer as optimizer_hooks  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

import baselines  # noqa: E402
import crd  # noqa: E402
import diagnostics  # noqa: E402
import plumbing  # noqa: E402

LOOP = "loop"  # the top-level phase of time spent in no wrapped function (main's own lines, tqdm)
VELOCITY = {"theta": "θ forward", "old": "old forward", None: "pretrained forward (cond + uncond)",
            "sampler": "sampler forward"}
ORDER = ["rollout", "reward", "train", "EMA snapshots (Eq. 8)", "grids, checkpoint, log", LOOP, "evaluation"]


class Phases:
    """Exclusive wall time and FLOPs per (top-level phase, innermost phase), over nested `enter` / `exit` calls.

    Time goes to the innermost open phase only; its key is (the outermost open phase's name, the innermost's name),
    (name, None) when only one is open, (LOOP, None) when none. FLOPs are read from `counter` (a FlopCounterMode,
    or None: not counted) at every boundary. `epoch` names the bucket the figures go into, so one run can hold a
    counted warm-up and timed iterations apart: seconds[epoch][key] (wall, s), cpu[epoch][key] (the process's CPU
    time, s, all threads), flops[epoch][key] (int), and events[epoch][name] counts how often phase `name` was
    entered. `clock` and `cpu_clock` return seconds (time.perf_counter, time.process_time).
    """

    def __init__(self, clock=time.perf_counter, cpu_clock=time.process_time):
        self.clock, self.cpu_clock, self.stack, self.counter, self.epoch = clock, cpu_clock, [], None, "setup"
        self.seconds = collections.defaultdict(lambda: collections.defaultdict(float))
        self.cpu = collections.defaultdict(lambda: collections.defaultdict(float))
        self.flops = collections.defaultdict(lambda: collections.defaultdict(int))
        self.events = collections.defaultdict(collections.Counter)
        self.mark_time, self.mark_cpu, self.mark_flops = clock(), cpu_clock(), 0

    def _total_flops(self):
        return self.counter.get_total_flops() if self.counter is not None else 0

    def _charge(self):
        now, cpu, flops = self.clock(), self.cpu_clock(), self._total_flops()
        key = ((self.stack[0], self.stack[-1] if len(self.stack) > 1 else None) if self.stack else (LOOP, None))
        self.seconds[self.epoch][key] += now - self.mark_time
        self.cpu[self.epoch][key] += cpu - self.mark_cpu
        self.flops[self.epoch][key] += max(flops - self.mark_flops, 0)
        self.mark_time, self.mark_cpu, self.mark_flops = now, cpu, flops

    def enter(self, name):
        """Open phase `name` inside the phases already open."""
        self._charge()
        self.stack.append(name)
        self.events[self.epoch][name] += 1

    def exit(self):
        """Close the innermost open phase."""
        self._charge()
        self.stack.pop()

    def switch(self, epoch, counter=None):
        """Charge what was spent so far to the current epoch, then go on in `epoch`, counting with `counter`."""
        self._charge()
        self.epoch, self.counter = epoch, counter
        self.mark_flops = self._total_flops()

    @contextlib.contextmanager
    def phase(self, name):
        """The with-block as phase `name` (enter, then exit even on an exception)."""
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, fn, name):
        """fn, timed as phase `name` (a string, or a function of fn's arguments giving one)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.phase(name(*args, **kwargs) if callable(name) else name):
                return fn(*args, **kwargs)
        return timed


# -- FLOP formulas torch's counter lacks: the CPU attention kernel, and EasyOCR's dynamically quantised layers --------
def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _linear_dynamic(x, packed, *args, out_val=None, **kwargs):
    weight = packed.unpack()[0]  # (out, in)
    return 2 * x.numel() // x.shape[-1] * weight.shape[0] * weight.shape[1]


def _quantized_lstm(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, *args,
                    out_val=None, **kwargs):
    hidden, directions = hx[0].shape[-1], 2 if bidirectional else 1
    steps_x_batch = x.shape[0] * x.shape[1]
    flops, width = 0, x.shape[-1]
    for _ in range(num_layers):  # 4 gates, each (width + hidden) x hidden multiply-adds per step and direction
        flops += directions * steps_x_batch * 2 * 4 * hidden * (width + hidden)
        width = hidden * directions
    return flops


for _raw in (_linear_dynamic, _quantized_lstm):
    _raw._get_raw = True
EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
               torch.ops.quantized.linear_dynamic: _linear_dynamic, torch.ops.aten.quantized_lstm: _quantized_lstm}


def flop_counter_mode():
    """A FlopCounterMode that also counts the CPU attention kernel and EasyOCR's int8 linear and LSTM layers."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)


# -- the machine's rate ------------------------------------------------------------------------------------------
def matmul_rate(m=2048, k=2048, n=2048, seconds=1.0):
    """fp32 torch.matmul of (m, k) x (k, n) at torch's current thread count: the best of repeated runs within about
    `seconds`, in GFLOP/s (2 m k n FLOPs per product)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.matmul(a, b, out=out)  # warm-up
    best, start = float("inf"), time.perf_counter()
    repeats = max(1, int(1e8 // (m * k * n)))  # at least ~0.1 GFLOP per timing
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * m * k * n / best / 1e9


def model_shape(cfg):
    """(rows, width) of the tiny transformer's typical matmul in a training pass: micro-batch x image tokens, and
    its inner width, from the model's local configs."""
    with open(os.path.join(cfg.model, "transformer", "config.json")) as f:
        transformer = json.load(f)
    with open(os.path.join(cfg.model, "vae", "config.json")) as f:
        factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    tokens = (cfg.height // factor // transformer["patch_size"]) * (cfg.width // factor // transformer["patch_size"])
    return cfg.micro_batch_size * tokens, transformer["num_attention_heads"] * transformer["attention_head_dim"]


# -- instrumenting crd.main from the outside ---------------------------------------------------------------------
LOSS = "loss terms (Eqs. 5, 7, 9, 10)"
TEXT, EULER, DECODE = "text encoding", "transformer forwards (Euler steps)", "VAE decode"


def reward_name(rewards):
    """The trained reward of a plumbing.Rewards as --reward spells it ('ocr', 'ocr:1,ink:0.5')."""
    return ",".join(name if weight == 1 else f"{name}:{weight:g}" for name, weight in rewards.trained)


def patches_for(phases):
    """The mock patches that time crd's, plumbing's, diagnostics' and baselines' functions as phases of `phases`
    (all but RunDirectory.progress, see `instrumented`). Each function is patched where it is looked up: the
    sampling functions in crd (for crd.rollout, also inside the implicit-reward check) and in plumbing (for
    plumbing.generate and PromptCache), velocity in crd (crd_pass), baselines (their passes) and diagnostics (the
    implicit-reward check of each evaluation), and the pass function as crd.loss_pass hands it to crd.main."""
    w = phases.wrap
    original_make_rewards, original_loss_pass = crd.make_rewards, crd.loss_pass

    def make_rewards(rewards, device, rank=0):
        reward_fn, unseen = original_make_rewards(rewards, device, rank)
        spec = reward_name(rewards)
        return (w(reward_fn, f"{spec} reward (EasyOCR)" if spec == "ocr" else f"{spec} reward"),
                {name: w(fn, f"{name} (unseen metric)") for name, fn in unseen.items()})

    def loss_pass(objective):
        one_pass, name = original_loss_pass(objective)
        return w(one_pass, LOSS), name

    velocity = w(crd.velocity, lambda transformer, adapter, *a, **k: VELOCITY[adapter])
    sampling = [(module, name, w(getattr(module, name), phase)) for module in (crd, plumbing)
                for name, phase in (("encode_prompts", TEXT), ("sample_latents", EULER), ("decode_latents", DECODE))]
    return [
        mock.patch.object(plumbing.RunDirectory, "evaluate", w(plumbing.RunDirectory.evaluate, "evaluation")),
        mock.patch.object(plumbing.RunDirectory, "end_iteration",
                          w(plumbing.RunDirectory.end_iteration, "grids, checkpoint, log")),
        mock.patch.object(crd, "make_rewards", make_rewards),
        mock.patch.object(crd, "rollout", w(crd.rollout, "rollout")),
        mock.patch.object(crd, "score", w(crd.score, "reward")),
        mock.patch.object(crd, "update", w(crd.update, "train")),
        mock.patch.object(crd, "move_snapshots", w(crd.move_snapshots, "EMA snapshots (Eq. 8)")),
        *(mock.patch.object(module, name, timed) for module, name, timed in sampling),
        *(mock.patch.object(module, "velocity", velocity) for module in (crd, baselines, diagnostics)),
        mock.patch.object(crd, "loss_pass", loss_pass),
        mock.patch.object(crd, "summarize", w(crd.summarize, "pass diagnostics")),
        mock.patch.object(crd, "pass_log", w(crd.pass_log, "pass diagnostics")),
        mock.patch.object(torch.nn.utils, "clip_grad_norm_", w(torch.nn.utils.clip_grad_norm_, "clip gradient norm")),
        mock.patch.object(torch.Tensor, "backward", w(torch.Tensor.backward, "θ backward")),
    ]


@contextlib.contextmanager
def instrumented(phases, on_iteration):
    """Wrap crd's, plumbing's, diagnostics' and baselines' functions as phases of `phases` for the duration
    (`patches_for`); on_iteration(i) is called as iteration i starts. Raises AttributeError (at once) if a wrapped
    name is gone from those modules."""
    original_progress = plumbing.RunDirectory.progress

    def progress(self, first):
        for iteration in original_progress(self, first):
            on_iteration(iteration)
            yield iteration
        on_iteration(None)  # the loop is over: what follows (the LoRA, the curves) is no iteration's

    patches = [mock.patch.object(plumbing.RunDirectory, "progress", progress), *patches_for(phases)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        hooks = [optimizer_hooks.register_optimizer_step_pre_hook(lambda *a: phases.enter("AdamW step")),
                 optimizer_hooks.register_optimizer_step_post_hook(lambda *a: phases.exit())]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


def run_job(cfg, iterations, counted_prompts=64):
    """crd.main(cfg) for 1 + `iterations` iterations under `instrumented`: iteration 0 and the evaluation before it
    counted by FlopCounterMode in epoch "counted" (that evaluation on the first `counted_prompts` held-out prompts
    only, one batch of `evaluate`; phases.eval_scale = cfg.eval_count / the prompts it scored scales its FLOPs to a
    whole evaluation), the other iterations and the evaluation after the last timed in epoch "timed". Returns
    (the Phases, crd.main's metrics)."""
    phases, counter = Phases(), flop_counter_mode()
    phases.eval_scale = 1.0
    original_evaluate = crd.evaluate

    def on_iteration(iteration):
        if iteration == 0:
            counter.__enter__()
            phases.switch("counted", counter)
        elif iteration == 1:
            phases.switch("timed")
            counter.__exit__(None, None, None)
        elif iteration is None:
            phases.switch("finish")

    def evaluate(generate, reward_fn, prompts, *args, **kwargs):  # the held-out evaluation, as start_job binds it
        if phases.epoch == "counted":  # the FLOPs of one batch, scaled: every batch of 64 costs the same
            phases.eval_scale = len(prompts) / len(prompts[:counted_prompts])
            prompts = prompts[:counted_prompts]
        return original_evaluate(generate, reward_fn, prompts, *args, **kwargs)

    cfg = dataclasses.replace(cfg, iterations=iterations + 1)
    with instrumented(phases, on_iteration), mock.patch.object(crd, "evaluate", evaluate):
        metrics = crd.main(cfg)
    return phases, metrics


# -- the table ---------------------------------------------------------------------------------------------------
Row = collections.namedtuple("Row", "phase seconds share gflop gflops fraction busy")


def table_rows(seconds, flops, iterations, evaluations, matmul_gflops, evaluations_per_iteration, cpu=None):
    """Aggregate one run's phases into rows: in ORDER of their top-level phase, then by time.

    seconds: {(top, leaf): s} summed over `iterations` timed iterations and `evaluations` timed evaluations (the
    phases whose top is "evaluation"); flops: {(top, leaf): FLOPs} of one iteration and one evaluation;
    matmul_gflops: the machine's rate (GFLOP/s); evaluations_per_iteration: the default job's evaluations per
    iteration (7 / 150). Each Row: phase ("top: leaf", "top: rest" for a nesting phase's own time, "top" for one
    without nested phases), seconds per iteration (an evaluation's times evaluations_per_iteration), share of the
    rows' total, GFLOP per iteration (scaled alike), achieved GFLOP/s and its fraction of matmul_gflops (both None
    without FLOPs or time), and busy: the CPU seconds per wall second of the phase, from cpu ({(top, leaf): CPU s}
    over the same iterations; None if not given; 2.0 = two cores busy throughout). Raises ValueError if phases were
    timed over 0 iterations or 0 evaluations."""
    rows, keys = [], set(seconds) | set(flops)
    nested = {top for top, leaf in keys if leaf is not None}
    for top, leaf in keys:
        is_eval = top == "evaluation"
        if (evaluations if is_eval else iterations) <= 0:
            raise ValueError(f"phase {top}: {leaf} timed over 0 {'evaluations' if is_eval else 'iterations'}")
        s = seconds.get((top, leaf), 0.0) * (evaluations_per_iteration / evaluations if is_eval else 1 / iterations)
        gflop = flops.get((top, leaf), 0) / 1e9 * (evaluations_per_iteration if is_eval else 1)
        gflops = gflop / s if gflop and s > 0 else None
        wall = seconds.get((top, leaf), 0.0)
        busy = cpu[(top, leaf)] / wall if cpu is not None and (top, leaf) in cpu and wall > 0 else None
        rows.append(Row(f"{top}: {leaf or 'rest'}" if top in nested else top, s, 0.0, gflop, gflops,
                        gflops / matmul_gflops if gflops else None, busy))
    total = sum(r.seconds for r in rows) or 1.0
    rank = {top: i for i, top in enumerate(ORDER)}
    return sorted((r._replace(share=r.seconds / total) for r in rows),
                  key=lambda r: (rank.get(r.phase.split(":")[0], len(ORDER)), -r.seconds))


def markdown(rows, matmul_gflops):
    """The rows as a Markdown table, with a total line."""
    lines = ["| phase | s / iteration | share | GFLOP / iteration | GFLOP/s | of the matmul rate | CPU s / s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.phase} | {r.seconds:.3f} | {r.share:.1%} | {r.gflop:.2f} | "
                     + (f"{r.gflops:.1f} | {r.fraction:.1%} | " if r.gflops else "– | – | ")
                     + (f"{r.busy:.2f} |" if r.busy is not None else "– |"))
    seconds, gflop = sum(r.seconds for r in rows), sum(r.gflop for r in rows)
    busy = [r for r in rows if r.busy is not None]
    mean_busy = sum(r.busy * r.seconds for r in busy) / max(sum(r.seconds for r in busy), 1e-12) if busy else None
    lines.append(f"| **total** | **{seconds:.3f}** | 100 % | {gflop:.2f} | {gflop / seconds:.1f} | "
                 f"{gflop / seconds / matmul_gflops:.1%} | " + (f"{mean_busy:.2f} |" if busy else "– |"))
    return "\n".join(lines)


def evaluations_per_iteration(cfg):
    """The evaluations of a full run of cfg (before iteration 0, every eval_every, after the last) per iteration."""
    during = sum(plumbing.evaluation_due(i, 0, cfg.eval_every) for i in range(cfg.iterations))
    return (during + 1) / cfg.iterations


def main(argv=None):
    """Measure the matmul rate, profile the default job (see the module docstring), print the table; returns its
    rows (Row tuples)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations, after the counted iteration 0")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's, the default job's: the cores, or OMP_NUM_THREADS)")
    parser.add_argument("--eval-count", type=int, default=crd.Config.eval_count,
                        help="held-out prompts per evaluation (the default job's 256; fewer for a quick look: the "
                             "evaluation's time and FLOPs are then scaled to 256)")
    parser.add_argument("--out", default="", help="run directory (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plumbing.quiet_known_warnings()
    default = crd.tiny_ocr()
    rows_width = model_shape(default)
    t0, load_before = time.time(), os.getloadavg()[0]
    rate_before = matmul_rate()
    small_rate = matmul_rate(rows_width[0], rows_width[1], rows_width[1])
    with tempfile.TemporaryDirectory(prefix="crd-profile-") as scratch:
        cfg = dataclasses.replace(default, output_dir=args.out or scratch, run_name="profile", overwrite=True,
                                  eval_count=args.eval_count)
        phases, _ = run_job(cfg, args.iterations)
    rate_after = matmul_rate()
    rate = max(rate_before, rate_after)
    scale = crd.Config.eval_count / args.eval_count  # an evaluation of eval_count prompts, scaled to the job's 256
    seconds, cpu, flops = ({k: v * (factor if k[0] == "evaluation" else 1) for k, v in values.items()}
                           for values, factor in ((phases.seconds["timed"], scale), (phases.cpu["timed"], scale),
                                                  (phases.flops["counted"], scale * phases.eval_scale)))
    rows = table_rows(seconds, flops, args.iterations, phases.events["timed"]["evaluation"], rate,
                      evaluations_per_iteration(default), cpu)
    setup = sum(phases.seconds["setup"].values())
    print(f"\nbench/profile_phases.py --iterations {args.iterations} --eval-count {args.eval_count}: the default job "
          f"at {args.threads} torch thread(s); {args.iterations} timed iteration(s) after a counted one; an "
          f"evaluation ({args.eval_count} prompts{f', scaled to {crd.Config.eval_count}' if scale != 1 else ''}) "
          f"spread over iterations as {evaluations_per_iteration(default) * default.iterations:.0f} in "
          f"{default.iterations}")
    print(f"fp32 matmul rate, 2048 x 2048 x 2048: {rate_before:.1f} GFLOP/s before the job, {rate_after:.1f} after "
          f"(the table uses {rate:.1f}); at the transformer's shape {rows_width[0]} x {rows_width[1]} x "
          f"{rows_width[1]}: {small_rate:.1f} GFLOP/s")
    print(f"setup (pipeline, OCR engines, first lines) {setup:.1f} s; whole profile {time.time() - t0:.0f} s; "
          f"1-minute load average {load_before:.2f} before it (other processes), {os.getloadavg()[0]:.2f} after\n")
    print(markdown(rows, rate))
    return rows


if __name__ == "__main__":
    main()
