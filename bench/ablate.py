"""CRD against its ablations, the DiffusionNFT baseline and a reward-free control, on the tiny OCR task.

Every variant is the CPU default of crd.py (`python crd.py --reward ocr`) plus the flags below, run for the same
number of iterations and seeds as its own process under --out/<variant>-s<seed>/. A finished run is skipped and an
interrupted one resumed (`--resume auto`), so the grid can be filled in pieces, two runs at a time:

    OMP_NUM_THREADS=1 python bench/ablate.py --variants crd,anchor-only --seeds 0,1,2 --out runs/main   # ~15 min/run
    python bench/ablate.py --report --out runs/main --name main        # docs/main.csv, main_runs.csv, main.png

The OCR runs are watched on the 128 validation prompts (data/tiny_ocr/val.txt: where settings are chosen); the
report scores each final LoRA once (cached, ~20 s each) on held-out prompts 1-256 and 257-512, which no choice has
seen, with the training engine and the unseen PP-OCRv4 engine, and adds the reward-hacking signs and the
diagnostics of each run (see `report`). `--out` and `--name` keep grids apart.

`--preset tiny_geneval` runs the same variants on the shapes-world GenEval task (`crd.py --preset tiny_geneval`,
watched on its held-out list) and reports the GenEval score, the partial credit and each tag's accuracy on the
held-out, validation and a training-prompt sample (`report_geneval`).
"""
import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

VARIANTS = {  # name -> flags added to `python crd.py --reward ocr`
    "crd": [],
    "crd-uniform": ["--time-weighting", "uniform"],  # Eq. (7) unweighted over sigma (the port)
    # Eq. (8) as the OCR recipe
    "paper-schedules": ["--old-decay", "0-0.25-0.005-0.999", "--sampler-decay", "75-0-0.0075-0.999"],
    "nft": ["--objective", "nft"],  # DiffusionNFT loss (docs/method.md, Eqs. A1-A2), same sampler, reward and budget
    "anchor-only": ["--objective", "anchor", "--no-adaptive-kl"],  # reward-free: CFG-anchor KL alone
    "no-anchor": ["--kl-beta", "0"],  # Eq. (10) weight exactly 0 (the floor no longer leaves 1e-4 (1 - r~))
    "frozen-reference": ["--old-decay", "0-1-0-1"],  # old = the initial theta, never moved
    "normalized-sigma": ["--time-weighting", "normalized-sigma"],  # lambda = sigma / mean sigma: mean weight 1
    "anchor-no-cfg": ["--kl-cfg", "1.0"],
    "no-adaptive-kl": ["--no-adaptive-kl"],
    "no-slow-reference": ["--old-decay", "0-0-0-0"],  # old = theta
    "no-decoupled-sampler": ["--sampler-decay", "0-0-0-0"],  # rollouts from theta itself
    "no-adaptive-norm": ["--no-adaptive-norm"],
    "batch-centering": ["--centering", "batch"],
    "anchor-only-kl-0.1": ["--objective", "anchor", "--no-adaptive-kl", "--kl-beta", "0.1"],  # the control at 0.1
    "kl-beta-0.1": ["--kl-beta", "0.1"],  # the OCR task's anchor weight (tiny_geneval's default is 2, chosen on val)
    "kl-beta-0.5": ["--kl-beta", "0.5"],
    "kl-beta-2": ["--kl-beta", "2"],  # tiny_ocr with a 20x stronger anchor (on tiny_geneval the same as crd)
}


VAL_EVAL = ["--eval-prompts", "data/tiny_ocr/val.txt", "--eval-count", "128"]  # OCR runs are watched on these


def command(variant, seed, iterations, out, preset="tiny_ocr"):
    """The crd.py command of one run: the task's default plus the variant's flags; OCR runs evaluate on the
    validation prompts (the held-out halves are scored by --report), GenEval runs on their held-out list."""
    task = ["--reward", "ocr"] if preset == "tiny_ocr" else ["--preset", preset]
    return ["python", "crd.py", *task, *VARIANTS[variant], "--seed", str(seed), "--iterations", str(iterations),
            *(VAL_EVAL if preset == "tiny_ocr" else []), "--output-dir", os.path.relpath(out, ROOT),
            "--run-name", f"{variant}-s{seed}"]


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def finished(run_dir, iterations):
    return any(m.get("eval/iteration") == iterations for m in read_metrics(run_dir))


def run(variants, seeds, iterations, out, preset="tiny_ocr"):
    for seed in seeds:  # seeds outermost: a partial grid still covers every variant
        for variant in variants:
            run_dir = os.path.join(out, f"{variant}-s{seed}")
            if finished(run_dir, iterations):
                print(f"{variant} seed {seed}: done, skipped", flush=True)
                continue
            cmd = command(variant, seed, iterations, out, preset)
            if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
                cmd += ["--resume", "auto"]
            print(" ".join(cmd), flush=True)
            subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True)


def cached_eval(run_dir, name, flags):
    """`crd.py --eval` of the run's final LoRA with `flags` (theta, no CFG, seeds 0, 1, ...), once: cached in
    <run>/NAME/eval.json. Returns that file's dict."""
    run_dir = os.path.abspath(run_dir)
    path = os.path.join(run_dir, name, "eval.json")
    if not os.path.isfile(path):
        subprocess.run([sys.executable, "crd.py", "--eval", *flags, "--output-dir", run_dir, "--run-name", name,
                        "--lora", os.path.join(run_dir, "lora")], cwd=ROOT, check=True)
    with open(path) as f:
        return json.load(f)


def final_eval(run_dir, start=0):
    """Score the run's final LoRA on held-out prompts start+1 ... start+256 (cached in <run>/final[-START]/)."""
    return cached_eval(run_dir, "final" + (f"-{start}" if start else ""),
                       ["--reward", "ocr", "--eval-start", str(start)])


CHECK_PROMPTS = (256, 64)  # the implicit-reward check's prompts: held-out 257-320 (start, count), K = 8 samples each
CHECK_DRAWS = 16  # (sigma, eps) draws per sample (diagnostics.CHECK_DRAWS): the noise ratio (se / within-group
# spread) is ~0.3 at 16


def checkpoint_config(checkpoint):
    """The crd.Config a checkpoint was trained with: fields crd.py no longer has are dropped, except that an old run's
    ocr_quantize = False becomes the reward option ocr.quantize=false (the reward it was trained with)."""
    import dataclasses

    import crd

    saved = checkpoint["config"]
    known = {f.name for f in dataclasses.fields(crd.Config)}
    cfg = crd.Config(**{k: v for k, v in saved.items() if k in known})
    if saved.get("ocr_quantize") is False and "ocr.quantize" not in cfg.reward_options:
        cfg = dataclasses.replace(cfg, reward_options=",".join(filter(None, [cfg.reward_options,
                                                                            "ocr.quantize=false"])))
    return cfg


def run_implicit_check(run_dir, start, count, draws):
    """diagnostics.implicit_reward_check of the run's final theta (and its final old snapshot, from checkpoint.pt)
    on held-out prompts start+1 ... start+count, on the CPU, scored by the run's trained reward alone."""
    import dataclasses

    import torch

    sys.path.insert(0, ROOT)
    import crd
    import diagnostics
    import plumbing

    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    cfg = checkpoint_config(checkpoint)
    device = torch.device("cpu")
    pipe = plumbing.load_frozen_pipeline(cfg, device)
    params = crd.add_lora_adapters(pipe.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    with torch.no_grad():
        for name in ("theta", "old"):
            for p, t in zip(params[name], checkpoint["lora"][name]):
                p.copy_(t)
    reward_fn, _ = plumbing.make_rewards(plumbing.parse_rewards(dataclasses.replace(cfg, eval_rewards="")), device)
    prompts = plumbing.read_prompts(os.path.join(ROOT, "data", "tiny_ocr", "heldout.txt"))[start:start + count]
    return diagnostics.implicit_reward_check(pipe, reward_fn, prompts, cfg, draws)


def implicit_check(run_dir, start=CHECK_PROMPTS[0], count=CHECK_PROMPTS[1], draws=CHECK_DRAWS):
    """diagnostics.implicit_reward_check of the run's final theta against the pretrained model and its final slow
    reference (both from checkpoint.pt), on held-out prompts start+1 ... start+count with K rollouts each; cached in
    <run>/implicit-START-COUNT-DRAWS.json. Returns the check's dict (with per_group_accuracy lists)."""
    path = os.path.join(run_dir, f"implicit-{start}-{count}-{draws}.json")
    if not os.path.isfile(path):
        result = run_implicit_check(run_dir, start, count, draws)
        with open(path, "w") as f:
            json.dump(result, f)
    with open(path) as f:
        return json.load(f)


def paired(a, b):
    """Mean and standard error over prompts of a - b, where a and b are per-seed lists of per-prompt values on the
    same prompts (each side first averaged over its seeds); NaN prompts (e.g. groups the check left out) dropped."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():  # a prompt NaN on every seed of a side: NaN, dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        diff = np.nanmean(np.array(a, dtype=float), 0) - np.nanmean(np.array(b, dtype=float), 0)
    diff = diff[~np.isnan(diff)]
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def write_runs(rows, iterations, out, name):
    """docs/NAME_runs.csv, one row per finished run; exits with a message when there is none."""
    if not rows:
        sys.exit(f"no finished runs of {iterations} iterations under {out}; run some first")
    os.makedirs(DOCS, exist_ok=True)
    with open(os.path.join(DOCS, f"{name}_runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (None, None)


def mean_over(metrics, key, first=None, last=None):
    """The mean of a per-iteration entry over iterations [first, last), NaNs (e.g. crd/corr_fresh at 0) left out."""
    values = [m[key] for m in metrics[first:last] if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])]
    return statistics.mean(values) if values else None


FRESH_FROM = 38  # crd/corr_fresh is averaged from this iteration on: before it DiffusionNFT's reference (its
# sampler) equals theta, so its r^ is 0 and its corr_fresh NaN; one range keeps the rows comparable


def finished_runs(out, iterations):
    """(variant, seed, run directory) of every run under `out` that finished `iterations` iterations, in the order
    of VARIANTS, then seed (0-99)."""
    for variant in VARIANTS:
        for seed in range(100):
            run_dir = os.path.join(out, f"{variant}-s{seed}")
            if finished(run_dir, iterations):
                yield variant, seed, run_dir


def prompt_scores(first_half, second_half, check):
    """One run's per-prompt values, paired over prompts across runs: its held-out rewards (training engine and
    PP-OCR, both halves) and its implicit-reward ranking accuracy per check prompt against each reference."""
    return {"heldout_1_256": first_half["per_prompt"]["reward"],
            "heldout_1_256_ppocr": first_half["per_prompt"]["ppocr"],
            "heldout_257_512": second_half["per_prompt"]["reward"],
            "heldout_257_512_ppocr": second_half["per_prompt"]["ppocr"],
            **{f"implicit_{ref}": check[f"implicit_per_group_accuracy_{ref}"] for ref in ("pretrained", "old")}}


def run_row(variant, seed, metrics, first_half, second_half, check, iterations, out):
    """One run's row of docs/NAME_runs.csv: its last validation scores, held-out scores, reward-hacking signs,
    implicit-reward check, diagnostics averaged over the run, rollout-reward rise and its command."""
    last = next(m for m in metrics if m.get("eval/iteration") == iterations)
    return {"variant": variant, "seed": seed, "val": last["eval/reward"], "val_ppocr": last.get("eval/ppocr"),
            "heldout_1_256": first_half["reward"], "heldout_1_256_ppocr": first_half["unseen"]["ppocr"],
            "heldout_257_512": second_half["reward"], "heldout_257_512_ppocr": second_half["unseen"]["ppocr"],
            "exact_1_256": first_half["exact"], "blank": first_half["blank"], "pixel_std": first_half["pixel_std"],
            "implicit_pretrained": check["implicit_accuracy_pretrained"],
            "implicit_pretrained_se": check["implicit_accuracy_se_pretrained"],
            "implicit_rho_pretrained": check["implicit_spearman_pretrained"],
            "implicit_old": check["implicit_accuracy_old"], "implicit_old_se": check["implicit_accuracy_se_old"],
            "implicit_noise": check["implicit_noise_pretrained"],
            "corr": mean_over(metrics, "crd/corr"), "corr_fresh": mean_over(metrics, "crd/corr_fresh", FRESH_FROM),
            "explained": mean_over(metrics, "crd/explained"),
            "rollout_rise": mean_over(metrics, "reward/mean", -25) - mean_over(metrics, "reward/mean", 0, 25),
            "command": " ".join(command(variant, seed, iterations, out))}


def collect_runs(iterations, out):
    """Score every finished OCR run (`final_eval` on both held-out halves, `implicit_check`; cached). Returns (rows
    of `run_row`, {variant: [validation curve [(iteration, reward)] per run]}, {variant: [`prompt_scores` per
    run]})."""
    rows, curves, per_prompt = [], {}, {}
    for variant, seed, run_dir in finished_runs(out, iterations):
        metrics = read_metrics(run_dir)
        evals = [(m["eval/iteration"], m["eval/reward"]) for m in metrics if "eval/reward" in m]
        first_half, second_half = final_eval(run_dir), final_eval(run_dir, start=256)
        check = implicit_check(run_dir)
        per_prompt.setdefault(variant, []).append(prompt_scores(first_half, second_half, check))
        rows.append(run_row(variant, seed, metrics, first_half, second_half, check, iterations, out))
        curves.setdefault(variant, []).append(evals)
    return rows, curves, per_prompt


def summarize_variants(rows, variants):
    """Per variant of `variants`: its seed count, flags and the mean and std over its seeds of every numeric
    column of `rows` (rounded to 4 places; '' where no seed has a value)."""
    keys = [k for k in rows[0] if k not in ("variant", "seed", "command")]
    summary = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "seeds": len(mine), "flags": " ".join(VARIANTS[variant])}
        for key in keys:
            values = [r[key] for r in mine if r[key] is not None]
            mean, std = mean_std(values)
            entry |= {f"{key}_mean": round(mean, 4) if values else "", f"{key}_std": round(std, 4) if values else ""}
        summary.append(entry)
    return summary


def write_summary(summary, name):
    """docs/NAME.csv: one row per variant (`summarize_variants`)."""
    with open(os.path.join(DOCS, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)


def plot_curves(curves, name):
    """docs/NAME.png: each variant's validation curve, mean over seeds with a ±1 std band (CRD drawn thicker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, runs in curves.items():
        steps = [i for i, _ in runs[0]]
        means, spread = zip(*(mean_std([dict(r)[i] for r in runs]) for i in steps))
        line, = ax.plot(steps, means, marker="o", ms=3, lw=2.5 if variant == "crd" else 1.2,
                        label=f"{variant} ({len(runs)} seeds)")
        ax.fill_between(steps, [m - s for m, s in zip(means, spread)], [m + s for m, s in zip(means, spread)],
                        color=line.get_color(), alpha=0.12)
    ax.set(xlabel="iteration", ylabel="validation OCR reward (128 prompts, no CFG)",
           title="Tiny OCR task, CPU: mean over seeds (bands: ±1 std)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, f"{name}.png"), dpi=120)


SHOWN = ["heldout_257_512", "heldout_257_512_ppocr", "heldout_1_256", "heldout_1_256_ppocr", "val", "rollout_rise",
         "implicit_pretrained", "implicit_old", "blank", "corr_fresh"]  # the printed summary's columns


def summary_cell(entry, key):
    """'mean ± std' of `key` in a `summarize_variants` entry, '' where it has none."""
    return f"{entry[key + '_mean']:.3f} ± {entry[key + '_std']:.3f}" if entry.get(key + "_mean") != "" else ""


def print_summary(summary, per_prompt):
    """The Markdown table of SHOWN per variant: mean ± std over seeds, and for the per-prompt scores the standard
    error over prompts of the seed-averaged score in brackets."""
    print("Mean ± std over seeds; [SE over prompts of the seed-averaged score]\n")
    print("| variant | seeds | " + " | ".join(SHOWN) + " | flags |")
    print("|---" * (len(SHOWN) + 3) + "|")
    for s in summary:
        runs = per_prompt[s["variant"]]
        se = {key: paired([r[key] for r in runs], [[0.0] * len(runs[0][key])])[1] for key in runs[0]}
        cells = [summary_cell(s, k) + (f" [{se[k]:.3f}]" if k in se else "") for k in SHOWN]
        print(f"| {s['variant']} | {s['seeds']} | " + " | ".join(cells) + f" | `{s['flags']}` |")


def print_differences(per_prompt):
    """The Markdown table of CRD minus each other variant on every per-prompt score: the difference of the
    seed-averaged scores, paired over prompts, with its paired SE (no rows without CRD runs)."""
    print("\nDifferences of seed-averaged scores, paired over prompts: mean [paired SE]; seeds of each side\n")
    keys = list(next(iter(per_prompt.values()))[0])
    print("| CRD minus | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for other in [v for v in per_prompt if v != "crd"] if "crd" in per_prompt else []:
        diffs = [paired([r[k] for r in per_prompt["crd"]], [r[k] for r in per_prompt[other]]) for k in keys]
        print(f"| {other} ({len(per_prompt['crd'])} vs {len(per_prompt[other])}) | "
              + " | ".join(f"{m:+.3f} [{e:.3f}]" for m, e in diffs) + " |")


def report(iterations, out, name):
    """The OCR grid's report. Each run evaluated theta on the validation prompts during training (--eval-on val: its
    curve and its last value); its final LoRA is scored here on held-out prompts 1-256 and 257-512 (`final_eval`,
    cached), which no choice has seen, by the training engine and the unseen PP-OCRv4 engine. Also per run: the
    reward-hacking signs (near-blank fraction, pixel std), the diagnostics averaged over the run (crd/corr,
    crd/corr_fresh, crd/explained) and the rise of the rollout reward (mean of the last 25 iterations minus the first
    25). Writes docs/NAME_runs.csv (per run, with its command), docs/NAME.csv (mean and std per variant) and
    docs/NAME.png (validation curves), and prints the summary as a Markdown table."""
    rows, curves, per_prompt = collect_runs(iterations, out)
    write_runs(rows, iterations, out, name)
    summary = summarize_variants(rows, curves)
    write_summary(summary, name)
    plot_curves(curves, name)
    print_summary(summary, per_prompt)
    print_differences(per_prompt)


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_DATA = os.path.join(ROOT, "data", "tiny_geneval")
TRAIN_STRIDE = 7  # the training-prompt sample: lines 1, 8, 15, ... of train.jsonl (258 lines, 43 per tag, 98 prompts)


def geneval_prompt_sets(out):
    """{name: (prompt file, line count)} of the prompt sets each final GenEval LoRA is scored on: "heldout" (the runs'
    own last evaluation, repeated with the unseen metric), "val" (val.jsonl, 33 prompts no run trains on) and "train"
    (every TRAIN_STRIDE-th line of train.jsonl, written to <out>/train_every7.jsonl: prompts the runs train on, with
    fresh noise). train.jsonl is ordered by tag, so its first lines would all be single-object prompts."""
    with open(os.path.join(GENEVAL_DATA, "train.jsonl")) as f:
        sample = [line for i, line in enumerate(f) if i % TRAIN_STRIDE == 0]
    os.makedirs(out, exist_ok=True)
    train = os.path.join(out, f"train_every{TRAIN_STRIDE}.jsonl")
    with open(train, "w") as f:
        f.writelines(sample)
    return {"heldout": (os.path.join(GENEVAL_DATA, "heldout.jsonl"), 256),
            "val": (os.path.join(GENEVAL_DATA, "val.jsonl"), 128), "train": (train, len(sample))}


def geneval_final_eval(run_dir, name, prompts, count):
    """Score the run's final LoRA on `prompts` (--preset tiny_geneval) with the unseen metric geneval_shapes_poly,
    cached in <run>/final-NAME/. Returns (GenEval score = mean over tags of geneval/correct, partial credit = mean
    reward, the unseen detector's partial credit)."""
    result = cached_eval(run_dir, f"final-{name}", ["--preset", "tiny_geneval", "--eval-prompts",
                                                    os.path.abspath(prompts), "--eval-count", str(count),
                                                    "--eval-rewards", "geneval_shapes_poly"])
    return result["tag_mean"]["geneval/correct"], result["reward"], result["unseen"]["geneval_shapes_poly"]


def report_geneval(iterations, out, name, preset):
    """The GenEval task's table: per variant, mean ± std over seeds of the final held-out GenEval score (the mean
    over the six tags of the fraction of images the benchmark's rules count correct), of the partial-credit reward
    the runs optimise and of each tag's fraction correct, then GenEval score / partial credit / unseen detector on
    each set of `geneval_prompt_sets` (held-out, val, training prompts); per-run rows in docs/NAME_runs.csv."""
    rows, prompt_sets = [], geneval_prompt_sets(out)
    for variant, seed, run_dir in finished_runs(out, iterations):
        extra = {}
        for set_name, (prompts, count) in prompt_sets.items():
            (extra[f"{set_name}_geneval"], extra[f"{set_name}_partial_credit"],
             extra[f"{set_name}_unseen_poly"]) = geneval_final_eval(run_dir, set_name, prompts, count)
        first, last = (next(m for m in read_metrics(run_dir) if m.get("eval/iteration") == i)
                       for i in (0, iterations))
        tags = {tag: last[f"eval/tag/{tag}/geneval/correct"] for tag in GENEVAL_TAGS}
        rows.append({"variant": variant, "seed": seed, "base_geneval": statistics.mean(
                         first[f"eval/tag/{tag}/geneval/correct"] for tag in GENEVAL_TAGS),
                     "geneval": statistics.mean(tags.values()), "partial_credit": last["eval/reward"], **tags,
                     **extra, "blank_fraction": last["eval/blank"], "pixel_std": last["eval/pixel_std"],
                     "command": " ".join(command(variant, seed, iterations, out, preset))})
    write_runs(rows, iterations, out, name)
    keys = ("geneval", "partial_credit", *GENEVAL_TAGS, *(f"{n}_{k}" for n in prompt_sets
                                                         for k in ("geneval", "partial_credit", "unseen_poly")))
    print(f"| variant | seeds | {' | '.join(keys)} | near-blank | flags |")
    print("|---" * (len(keys) + 4) + "|")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (mean_std([r[k] for r in mine]) for k in keys)]
        print(f"| {variant} | {len(mine)} | {' | '.join(cells)} | "
              f"{statistics.mean(r['blank_fraction'] for r in mine):.3f} | `{' '.join(VARIANTS[variant])}` |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="crd,nft,anchor-only", help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated integers")
    parser.add_argument("--iterations", type=int, default=150, help="CRD iterations per run (the OCR default: 150; "
                        "tiny_geneval: 75)")
    parser.add_argument("--report", action="store_true", help="only aggregate finished runs into docs/")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "ablate"), help="where the runs live")
    parser.add_argument("--name", default="ablation", help="report files: docs/NAME.csv, NAME_runs.csv, NAME.png")
    parser.add_argument("--preset", default="tiny_ocr", choices=["tiny_ocr", "tiny_geneval"],
                        help="the task: tiny_ocr (`crd.py --reward ocr`) or tiny_geneval (`crd.py --preset "
                             "tiny_geneval`, reported by GenEval score and tag)")
    args = parser.parse_args()
    if args.report and args.preset == "tiny_geneval":
        report_geneval(args.iterations, os.path.abspath(args.out), args.name, args.preset)
    elif args.report:
        report(args.iterations, os.path.abspath(args.out), args.name)
    else:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
        run(args.variants.split(","), [int(s) for s in args.seeds.split(",")], args.iterations,
            os.path.abspath(args.out), args.preset)
