"""CRD against its ablations, the DiffusionNFT baseline and a reward-free control, on the tiny OCR task.

Every variant is the CPU default of crd.py (`python crd.py --reward ocr`) plus the flags below, run for the same
number of iterations and seeds as its own process under runs/ablate/<variant>-s<seed>/. A finished run is skipped
and an interrupted one resumed (`--resume auto`), so the grid can be filled in pieces:

    python bench/ablate.py --variants crd,nft,anchor-only --seeds 0,1,2   # ~12 min per run on 2 CPU cores
    python bench/ablate.py --report                                        # docs/ablation*.csv, docs/ablation.png

The report reads each run's metrics.jsonl (held-out OCR reward of theta, no CFG, every 15 iterations, with the
reward-hacking signs: fraction of near-blank images, mean per-image grey-level std). `--report --rescore` scores
each saved final LoRA once more with `crd.py --eval --lora` instead (a check that the saved LoRA, loaded the
diffusers way, is the model that was evaluated; ~1 min per run). Variants with fewer seeds than asked are reported
with the seeds they have.

The grid in docs/ablation* was run on the previous embedded model (step 4,500 of the same pretraining run, shipped
up to commit cf35ed8; `python tools/pretrain_tiny.py --keep-step 4500` rebuilds it into assets/), and THRESHOLD
sits between that model's scores without and with CFG.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "ablate")
DOCS = os.path.join(ROOT, "docs")
THRESHOLD = 0.45  # held-out reward between the step-4,500 base without CFG (0.34) and with CFG 4.5 (0.51)

VARIANTS = {  # name -> flags added to `python crd.py --reward ocr`
    "crd": [],
    "nft": ["--objective", "nft"],  # DiffusionNFT loss (CRD_SPEC Appendix A), same sampler, reward and budget
    "anchor-only": ["--objective", "anchor", "--no-adaptive-kl"],  # reward-free: CFG-anchor KL alone
    "no-anchor": ["--kl-beta", "0"],
    "anchor-no-cfg": ["--kl-cfg", "1.0"],
    "no-adaptive-kl": ["--no-adaptive-kl"],
    "no-slow-reference": ["--no-slow-reference"],
    "no-decoupled-sampler": ["--no-decoupled-sampler"],
    "no-adaptive-norm": ["--no-adaptive-norm"],
    "batch-centering": ["--centering", "batch"],
}


def command(variant, seed, iterations):
    return ["python", "crd.py", "--reward", "ocr", *VARIANTS[variant], "--seed", str(seed),
            "--iterations", str(iterations), "--output-dir", "runs/ablate", "--run-name", f"{variant}-s{seed}"]


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def finished(run_dir, iterations):
    return any(m.get("eval/iteration") == iterations for m in read_metrics(run_dir))


def run(variants, seeds, iterations):
    for seed in seeds:  # seeds outermost: a partial grid still covers every variant
        for variant in variants:
            run_dir = os.path.join(OUT, f"{variant}-s{seed}")
            if finished(run_dir, iterations):
                print(f"{variant} seed {seed}: done, skipped", flush=True)
                continue
            cmd = command(variant, seed, iterations)
            if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
                cmd += ["--resume", "auto"]
            print(" ".join(cmd), flush=True)
            subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True)


def final_eval(run_dir):
    """Score the run's final LoRA on the held-out prompts (once; cached in <run>/final/eval.json)."""
    path = os.path.join(run_dir, "final", "eval.json")
    if not os.path.isfile(path):
        name = os.path.relpath(os.path.join(run_dir, "final"), OUT)
        subprocess.run([sys.executable, "crd.py", "--eval", "--reward", "ocr", "--output-dir", OUT,
                        "--lora", os.path.join(run_dir, "lora"), "--run-name", name], cwd=ROOT, check=True)
    with open(path) as f:
        return json.load(f)


def final_scores(run_dir, metrics, iterations, rescore=False):
    """Held-out scores of a finished run's final model: its own last evaluation in `metrics` (its metrics.jsonl),
    or a re-score of the saved LoRA (with `rescore`, or for runs logged before pixel_std / blank were recorded)."""
    last = next(m for m in metrics if m.get("eval/iteration") == iterations)
    if rescore or "eval/pixel_std" not in last:
        return final_eval(run_dir)
    return {k: last[f"eval/{k}"] for k in ("reward", "exact", "blank", "pixel_std")}


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (None, None)


def report(iterations, rescore=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves = [], {}
    for variant in VARIANTS:
        for seed in range(100):
            run_dir = os.path.join(OUT, f"{variant}-s{seed}")
            if not finished(run_dir, iterations):
                continue
            metrics = read_metrics(run_dir)
            evals = [(m["eval/iteration"], m["eval/reward"]) for m in metrics if "eval/reward" in m]
            final = final_scores(run_dir, metrics, iterations, rescore)
            reached = [i for i, r in evals if r >= THRESHOLD]
            rows.append({"variant": variant, "seed": seed, "final_reward": dict(evals)[iterations],
                         "final_exact": final["exact"], "iterations_to_threshold": reached[0] if reached else "",
                         "blank_fraction": final["blank"], "pixel_std": final["pixel_std"],
                         "command": " ".join(command(variant, seed, iterations))})
            curves.setdefault(variant, []).append(evals)
    if not rows:
        sys.exit(f"no finished runs of {iterations} iterations under {OUT}; run some first")
    os.makedirs(DOCS, exist_ok=True)
    with open(os.path.join(DOCS, "ablation_runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    summary = []
    for variant in curves:
        mine = [r for r in rows if r["variant"] == variant]
        reward_mean, reward_std = mean_std([r["final_reward"] for r in mine])
        reached = [r["iterations_to_threshold"] for r in mine if r["iterations_to_threshold"] != ""]
        summary.append({"variant": variant, "seeds": len(mine), "final_reward_mean": round(reward_mean, 4),
                        "final_reward_std": round(reward_std, 4),
                        "iterations_to_threshold": (f"{statistics.mean(reached):.0f} ({len(reached)}/{len(mine)})"
                                                    if reached else f"- (0/{len(mine)})"),
                        "blank_fraction": round(statistics.mean(r["blank_fraction"] for r in mine), 4),
                        "pixel_std": round(statistics.mean(r["pixel_std"] for r in mine), 4),
                        "flags": " ".join(VARIANTS[variant])})
    with open(os.path.join(DOCS, "ablation.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)

    # Left: CRD against the baseline and the control, with ±1 std bands. Right: CRD against its ablations, lines only.
    # CRD is drawn last, thick and black, so that it stays visible under ten overlapping curves.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = [("baseline and reward-free control", ["nft", "anchor-only"], True),
              ("drift-control and design ablations", [v for v in curves if v not in ("crd", "nft", "anchor-only")], False)]
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
        ax.axhline(THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="iteration", title=f"CRD vs {title}")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("held-out OCR reward (256 prompts, no CFG)")
    fig.suptitle("Tiny OCR task, CPU: mean over seeds (bands: ±1 std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "ablation.png"), dpi=120)
    print("| variant | seeds | final held-out OCR (mean ± std) | iterations to 0.45 (runs reaching it) | "
          "near-blank | pixel std | flags |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['variant']} | {s['seeds']} | {s['final_reward_mean']:.3f} ± {s['final_reward_std']:.3f} | "
              f"{s['iterations_to_threshold']} | {s['blank_fraction']:.3f} | {s['pixel_std']:.3f} | "
              f"`{s['flags']}` |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="crd,nft,anchor-only", help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated integers")
    parser.add_argument("--iterations", type=int, default=75, help="CRD iterations per run (the CPU default: 75)")
    parser.add_argument("--report", action="store_true", help="only aggregate finished runs into docs/")
    parser.add_argument("--rescore", action="store_true", help="with --report: re-score every saved final LoRA")
    args = parser.parse_args()
    if args.report:
        report(args.iterations, args.rescore)
    else:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
        run(args.variants.split(","), [int(s) for s in args.seeds.split(",")], args.iterations)
