"""CRD against its ablations, the DiffusionNFT baseline and a reward-free control, on the tiny OCR task.

Every variant is the CPU default of crd.py (`python crd.py --reward ocr`) plus the flags below, run for the same
number of iterations and seeds as its own process under runs/ablate/<variant>-s<seed>/. A finished run is skipped
and an interrupted one resumed (`--resume auto`), so the grid can be filled in pieces:

    python bench/ablate.py --variants crd,nft,anchor-only --seeds 0,1,2   # ~12 min per run on 2 CPU cores
    python bench/ablate.py --report                                        # docs/ablation*.csv, docs/ablation.png

`--preset tiny_geneval` runs the same variants on the shapes-world GenEval task (`crd.py --preset tiny_geneval`)
and reports the held-out GenEval score, the partial credit and each tag's accuracy instead.

The report reads each run's metrics.jsonl (held-out OCR reward of theta, no CFG, at every evaluation, with the
unseen PP-OCRv4 metric when it was logged and the reward-hacking signs: fraction of near-blank images, mean
per-image grey-level std) and scores each final LoRA once on the second half of the held-out list (prompts
257-512, `crd.py --eval --eval-start 256`; cached, ~1 min per run), which no choice of setting or checkpoint has
seen. `--report --rescore` also re-scores the first half from the saved LoRA instead of the run's own last
evaluation. Variants with fewer seeds than asked are reported with the seeds they have. `--out` and `--name` keep
grids apart (runs under --out, docs/<name>*.csv and .png).

The grid in docs/ablation* was run on the previous embedded model (step 4,500 of the same pretraining run, shipped
up to commit cf35ed8; `python tools/pretrain_tiny.py --keep-step 4500` rebuilds it into assets/) with the defaults
of that time, and its threshold (0.45) sits between that model's scores without and with CFG; docs/main* is the
grid on the current model and defaults (`--out runs/main --name main --threshold 0.6`).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

VARIANTS = {  # name -> flags added to `python crd.py --reward ocr`
    "crd": [],
    "crd-sigma": ["--time-weighting", "sigma"],  # Eq. (7) weighted by sigma (at theta = old: DiffusionNFT's gradient)
    "crd-uniform": ["--time-weighting", "uniform"],
    "no-anchor-sigma": ["--kl-beta", "0", "--time-weighting", "sigma"],
    "paper-schedules": ["--old-decay-max", "0.999", "--sampler-decay-max", "0.999"],  # Eq. (8) as the OCR recipe
    "nft": ["--objective", "nft"],  # DiffusionNFT loss (docs/method.md, Eqs. A1-A2), same sampler, reward and budget
    "anchor-only": ["--objective", "anchor", "--no-adaptive-kl"],  # reward-free: CFG-anchor KL alone
    "no-anchor": ["--kl-beta", "0"],
    "anchor-no-cfg": ["--kl-cfg", "1.0"],
    "no-adaptive-kl": ["--no-adaptive-kl"],
    "no-slow-reference": ["--no-slow-reference"],
    "no-decoupled-sampler": ["--no-decoupled-sampler"],
    "no-adaptive-norm": ["--no-adaptive-norm"],
    "batch-centering": ["--centering", "batch"],
    "anchor-only-kl-0.1": ["--objective", "anchor", "--no-adaptive-kl", "--kl-beta", "0.1"],  # the control at 0.1
    "kl-beta-0.1": ["--kl-beta", "0.1"],  # the OCR task's anchor weight (tiny_geneval's default is 2, chosen on val)
    "kl-beta-0.5": ["--kl-beta", "0.5"],
    "kl-beta-2": ["--kl-beta", "2"],  # tiny_ocr with a 20x stronger anchor (on tiny_geneval the same as crd)
}


VAL_EVAL = ["--eval-prompts", "data/tiny_ocr/val.txt", "--eval-count", "128"]  # --eval-on val: choose on these


def command(variant, seed, iterations, out, preset="tiny_ocr", eval_on="heldout"):
    task = ["--reward", "ocr"] if preset == "tiny_ocr" else ["--preset", preset]
    return ["python", "crd.py", *task, *VARIANTS[variant], "--seed", str(seed), "--iterations", str(iterations),
            *(VAL_EVAL if eval_on == "val" else []), "--output-dir", os.path.relpath(out, ROOT),
            "--run-name", f"{variant}-s{seed}"]


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def finished(run_dir, iterations):
    return any(m.get("eval/iteration") == iterations for m in read_metrics(run_dir))


def run(variants, seeds, iterations, out, preset="tiny_ocr", eval_on="heldout"):
    for seed in seeds:  # seeds outermost: a partial grid still covers every variant
        for variant in variants:
            run_dir = os.path.join(out, f"{variant}-s{seed}")
            if finished(run_dir, iterations):
                print(f"{variant} seed {seed}: done, skipped", flush=True)
                continue
            cmd = command(variant, seed, iterations, out, preset, eval_on)
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


def final_scores(run_dir, metrics, iterations, rescore=False):
    """Held-out scores of a finished run's final model: its own last evaluation in `metrics` (its metrics.jsonl),
    or a re-score of the saved LoRA (with `rescore`, or for runs logged before pixel_std / blank were recorded)."""
    last = next(m for m in metrics if m.get("eval/iteration") == iterations)
    if rescore or "eval/pixel_std" not in last:
        result = final_eval(run_dir)
        return result | {"ppocr": result.get("unseen", {}).get("ppocr")}
    return {k: last.get(f"eval/{k}") for k in ("reward", "exact", "blank", "pixel_std", "ppocr")}


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


def report(iterations, out, name, threshold, rescore=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves = [], {}
    for variant in VARIANTS:
        for seed in range(100):
            run_dir = os.path.join(out, f"{variant}-s{seed}")
            if not finished(run_dir, iterations):
                continue
            metrics = read_metrics(run_dir)
            evals = [(m["eval/iteration"], m["eval/reward"]) for m in metrics if "eval/reward" in m]
            final = final_scores(run_dir, metrics, iterations, rescore)
            second = final_eval(run_dir, start=256)  # held-out prompts 257-512: seen by no choice
            reached = [i for i, r in evals if r >= threshold]
            rows.append({"variant": variant, "seed": seed, "final_reward": dict(evals)[iterations],
                         "final_exact": final["exact"], "final_unseen_ppocr": final["ppocr"],
                         "heldout_257_512": second["reward"],
                         "heldout_257_512_ppocr": second.get("unseen", {}).get("ppocr"),
                         "iterations_to_threshold": reached[0] if reached else "",
                         "blank_fraction": final["blank"], "pixel_std": final["pixel_std"],
                         "command": " ".join(command(variant, seed, iterations, out))})
            curves.setdefault(variant, []).append(evals)
    write_runs(rows, iterations, out, name)

    summary = []
    for variant in curves:
        mine = [r for r in rows if r["variant"] == variant]
        reward_mean, reward_std = mean_std([r["final_reward"] for r in mine])
        reached = [r["iterations_to_threshold"] for r in mine if r["iterations_to_threshold"] != ""]
        extra = {}
        for key in ("final_unseen_ppocr", "heldout_257_512", "heldout_257_512_ppocr"):
            values = [r[key] for r in mine if r[key] is not None]
            mean, std = mean_std(values)
            extra |= {f"{key}_mean": round(mean, 4) if values else "", f"{key}_std": round(std, 4) if values else ""}
        summary.append({"variant": variant, "seeds": len(mine), "final_reward_mean": round(reward_mean, 4),
                        "final_reward_std": round(reward_std, 4), **extra,
                        "iterations_to_threshold": (f"{statistics.mean(reached):.0f} ({len(reached)}/{len(mine)})"
                                                    if reached else f"- (0/{len(mine)})"),
                        "blank_fraction": round(statistics.mean(r["blank_fraction"] for r in mine), 4),
                        "pixel_std": round(statistics.mean(r["pixel_std"] for r in mine), 4),
                        "flags": " ".join(VARIANTS[variant])})
    with open(os.path.join(DOCS, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)

    # Left: CRD against the baseline and the control, with ±1 std bands. Right: CRD against its ablations, lines only.
    # CRD is drawn last, thick and black, so that it stays visible under ten overlapping curves.
    panels = [("baseline and reward-free control", ["nft", "anchor-only"], True),
              ("drift-control and design ablations", [v for v in curves if v not in ("crd", "nft", "anchor-only")],
               False)]
    panels = [p for p in panels if any(v in curves for v in p[1])] or panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (title, variants, bands) in zip(axes, panels):
        for variant in [v for v in variants if v in curves] + (["crd"] if "crd" in curves else []):
            runs = curves[variant]
            steps = [i for i, _ in runs[0]]
            values = [[dict(r)[i] for r in runs] for i in steps]
            means, spread = zip(*(mean_std(v) for v in values))
            style = dict(color="black", lw=2.5, zorder=5) if variant == "crd" else dict(lw=1.2)
            line, = ax.plot(steps, means, marker="o", ms=3, label=f"{variant} ({len(runs)} seeds)", **style)
            if bands or variant == "crd":
                ax.fill_between(steps, [m - s for m, s in zip(means, spread)], [m + s for m, s in zip(means, spread)],
                                color=line.get_color(), alpha=0.12)
        ax.axhline(threshold, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="iteration", title=f"CRD vs {title}")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("held-out OCR reward (256 prompts, no CFG)")
    fig.suptitle("Tiny OCR task, CPU: mean over seeds (bands: ±1 std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, f"{name}.png"), dpi=120)

    def cell(s, key):
        return f"{s[key + '_mean']:.3f} ± {s[key + '_std']:.3f}" if s.get(key + "_mean") != "" else ""

    print(f"| variant | seeds | held-out 1-256 | unseen PP-OCR, 1-256 | held-out 257-512 | unseen PP-OCR, 257-512 | "
          f"iterations to {threshold} | near-blank | pixel std | flags |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['variant']} | {s['seeds']} | {s['final_reward_mean']:.3f} ± {s['final_reward_std']:.3f} | "
              f"{cell(s, 'final_unseen_ppocr')} | {cell(s, 'heldout_257_512')} | {cell(s, 'heldout_257_512_ppocr')} | "
              f"{s['iterations_to_threshold']} | {s['blank_fraction']:.3f} | {s['pixel_std']:.3f} | `{s['flags']}` |")


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
    for variant in VARIANTS:
        for seed in range(100):
            run_dir = os.path.join(out, f"{variant}-s{seed}")
            if not finished(run_dir, iterations):
                continue
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
    parser.add_argument("--iterations", type=int, default=75, help="CRD iterations per run (the CPU default: 75)")
    parser.add_argument("--report", action="store_true", help="only aggregate finished runs into docs/")
    parser.add_argument("--rescore", action="store_true", help="with --report: re-score every saved final LoRA")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "ablate"), help="where the runs live")
    parser.add_argument("--name", default="ablation", help="report files: docs/NAME.csv, NAME_runs.csv, NAME.png")
    parser.add_argument("--threshold", type=float, default=0.45, help="held-out reward counted as 'reached'")
    parser.add_argument("--eval-on", default="heldout", choices=["heldout", "val"],
                        help="prompts of the evaluations during each run: heldout (1-256, the crd.py default) or val "
                             "(data/tiny_ocr/val.txt, 128: for choosing settings; the final LoRAs are then scored on "
                             "both held-out halves by --report)")
    parser.add_argument("--preset", default="tiny_ocr", choices=["tiny_ocr", "tiny_geneval"],
                        help="the task: tiny_ocr (`crd.py --reward ocr`) or tiny_geneval (`crd.py --preset "
                             "tiny_geneval`, reported by GenEval score and tag)")
    args = parser.parse_args()
    if args.report and args.preset == "tiny_geneval":
        report_geneval(args.iterations, os.path.abspath(args.out), args.name, args.preset)
    elif args.report:
        report(args.iterations, os.path.abspath(args.out), args.name, args.threshold, args.rescore)
    else:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
        run(args.variants.split(","), [int(s) for s in args.seeds.split(",")], args.iterations,
            os.path.abspath(args.out), args.preset, args.eval_on)
