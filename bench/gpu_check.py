"""One prepared check for a short slot on a GPU machine: the `sd35m_ocr` code path at full size, then the tiny OCR
comparison on the GPU, from a bare image with no network.

    python bench/gpu_check.py --prepare gpu_check      # here, with PyPI: the wheels the image lacks + EasyOCR's
                                                       # English recogniser into gpu_check/ (the carried total checked)
    python bench/gpu_check.py --check-size gpu_check   # the carried total alone
    python bench/gpu_check.py --wheels gpu_check       # there (one GPU): installs them into a scratch folder, runs
                                                       # (a) then (b), each in its own processes and time budget
    python bench/gpu_check.py --scale tiny             # a CPU: the same two parts at toy size (run by the tests)

Order of a run: the versions (python, torch, CUDA, diffusers, transformers, peft, accelerate, ...) first; with
--wheels, the wheels installed offline into --work's site/ (a scratch folder, by default a new temporary one, never
under --out) and the versions again as the parts will import them; then
(a) bench/full_size.py at full size with random weights and --prompts-per-iteration 1 (one whole group of 24
    images): seconds per image of rollout and reward, per training pass, the peak GPU memory at the preset's
    micro-batch of 24, and the preset's seconds per iteration scaled from them; one process, stopped after
    --budget-a seconds (270);
(b) run whatever (a) did: the tiny OCR task of the CPU default on the GPU: CRD, the reward-free control and
    DiffusionNFT for each of --seeds, as concurrent `crd.py` processes (OMP_NUM_THREADS = cores / runs each),
    stopped after --budget-b seconds (210). OUT/tiny_ocr.md is rewritten every few seconds while they run: per run
    its status and last held-out reward (prompts 1-256, no CFG), per variant the mean ± std at the latest
    iteration every run has evaluated; rows of runs not done are marked partial.
OUT holds only gpu_check.log (the whole console, as it goes), full_size.log ((a)'s output), tiny_ocr.md and
tiny_metrics.jsonl (every (b) run's metrics.jsonl lines, with its name); the runs themselves stay in --work.

The image is expected to have PyTorch, torchvision, transformers, peft, accelerate, opencv, scikit-image, scipy,
tensorboard and matplotlib (Python 3.12); it lacks diffusers, EasyOCR (and its python-bidi), Levenshtein (and its
rapidfuzz), which travel as wheels, each repacked uncompressed and xz-compressed whole (9.7 MiB of wheels travel
as 4.0). The OCR reward reads without text detection at tiny scale, so only EasyOCR's recogniser weights travel;
the unseen PP-OCR metric is left out (--eval-rewards '').
"""
import argparse
import json
import lzma
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = ["diffusers==0.42.1", "importlib_metadata==10.2.0", "easyocr==1.7.2", "python-bidi==0.6.12",
          "levenshtein==0.27.5", "rapidfuzz==3.14.6"]  # what a bare GPU image lacks, pinned as requirements.txt
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
LIMIT_MIB, SPARE_MIB = 64, 4  # what can travel to the GPU machine (the repository's files and the prepared folder),
                              # and what must be left free of it for the repository to grow
NOT_NEEDED = ["assets/tiny-sd3-shapes", "data/geneval", "docs", "data/tiny_geneval"]  # travel, unused by this check
RECOGNISER = "english_g2.pth"  # EasyOCR's English recogniser (the detector's weights are not needed at tiny scale)
TINY_EVAL_COUNT = 16  # held-out prompts per evaluation of (b) on a CPU (--scale tiny); on a GPU the default 256
VARIANTS = {"crd": [], "anchor-only": ["--objective", "anchor", "--no-adaptive-kl"], "nft": ["--objective", "nft"]}
VERSIONS = ["diffusers", "transformers", "peft", "accelerate", "easyocr", "levenshtein", "rapidfuzz", "python-bidi",
            "importlib_metadata"]
VERSIONS_CODE = """
import importlib.metadata as m, platform
parts = ['python ' + platform.python_version()]
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'
    parts.append(f'torch {torch.__version__} (CUDA {torch.version.cuda}, {gpu})')
except Exception as error:
    parts.append(f'torch: cannot import ({error})')
versions = {}
for name in NAMES:
    try:
        versions[name] = m.version(name)
    except m.PackageNotFoundError:
        versions[name] = None
print('versions: ' + ', '.join(parts + [f'{k} {v or "absent"}' for k, v in versions.items()]))
try:
    from diffusers.utils.constants import MIN_PEFT_VERSION
    from packaging.version import Version
    if versions['peft'] and Version(versions['peft']) < Version(MIN_PEFT_VERSION):
        print(f'peft {versions["peft"]} is older than the {MIN_PEFT_VERSION} diffusers needs for LoRA: prepare with '
              f'--also peft==0.21.2')
except ImportError:
    pass
"""


class Console:
    """print() that also appends each line to a log file (OUT/gpu_check.log) at once, so that a run stopped from
    outside leaves its log."""

    def __init__(self, path):
        self.path = path

    def __call__(self, *lines):
        self.write("".join(line + "\n" for line in lines))

    def write(self, text):
        """Print `text` as it is (newlines included) and append it to the log."""
        print(text, end="", flush=True)
        with open(self.path, "a") as f:
            f.write(text)


# -- what travels ------------------------------------------------------------------------------------------------
def folder_mib(path):
    """Size of the files under `path`, in MiB."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def travelling_files(root=ROOT):
    """{path relative to root: bytes} of what travels with the working tree: tracked files and untracked files git
    does not ignore (`git ls-files --cached --others --exclude-standard`); deleted tracked files are left out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return {p: os.path.getsize(os.path.join(root, p)) for p in listed if p and os.path.isfile(os.path.join(root, p))}


def check_carry(folder, root=ROOT, limit=LIMIT_MIB, spare=SPARE_MIB):
    """The carried total: the repository's travelling files (those under `folder` counted once) plus `folder`,
    against `limit` MiB with `spare` MiB left free. Returns the line saying so; raises SystemExit naming what to
    leave out until enough would be shed: the untracked files first, then the parts of the repository this check
    does not use (NOT_NEEDED), then the files of `folder`, each group largest first."""
    folder = os.path.abspath(folder)
    inside = os.path.relpath(folder, root) + os.sep if folder.startswith(os.path.abspath(root) + os.sep) else None
    repo = {p: s for p, s in travelling_files(root).items() if not (inside and p.startswith(inside))}
    prepared = folder_mib(folder) if os.path.isdir(folder) else 0.0
    total = sum(repo.values()) / 2**20 + prepared
    line = (f"carried: the repository's files {sum(repo.values()) / 2**20:.1f} MiB + {folder} {prepared:.1f} MiB = "
            f"{total:.1f} MiB of {limit}; {limit - total:.1f} MiB to spare (at least {spare} needed)")
    if total <= limit - spare:
        return line
    tracked = set(subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split("\0"))
    candidates = sorted(((s / 2**20, f"{p} (untracked)") for p, s in repo.items() if p not in tracked), reverse=True)
    candidates += sorted(((sum(s for p, s in repo.items() if p == part or p.startswith(part + "/")) / 2**20,
                           f"{part} (not used by this check)") for part in NOT_NEEDED), reverse=True)
    if os.path.isdir(folder):
        candidates += sorted(((os.path.getsize(os.path.join(d, f)) / 2**20, f"{os.path.join(d, f)} (prepared)")
                              for d, _, files in os.walk(folder) for f in files), reverse=True)
    needed, chosen = total - (limit - spare), []
    for size, what in candidates:
        if needed <= 0:
            break
        if not size:
            continue
        chosen.append(f"{what} {size:.1f} MiB")
        needed -= size
    raise SystemExit(f"{line}. Leave out {total - (limit - spare):.1f} MiB, e.g.: " + "; ".join(chosen))


# -- wheels ------------------------------------------------------------------------------------------------------
def english_only(wheel):
    """Rewrite EasyOCR's wheel without the character lists of its other languages (2.6 MB of the 2.9)."""
    slim = wheel + ".slim"
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if not item.filename.startswith("easyocr/character/") or item.filename.endswith("/en_char.txt"):
                target.writestr(item, source.read(item))
    os.replace(slim, wheel)


def pack_wheel(wheel, folder):
    """Write `wheel` (a .whl path) to FOLDER/<its name>.xz: its entries stored uncompressed, then the whole archive
    xz-compressed (one stream across all files: diffusers' 6.1 MiB wheel becomes 1.8). Returns the new path."""
    stored = os.path.join(folder, os.path.basename(wheel) + ".stored")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = source.read(item)  # read before the entry's compression is changed for its copy
            item.compress_type = zipfile.ZIP_STORED
            target.writestr(item, data)
    packed = os.path.join(folder, os.path.basename(wheel) + ".xz")
    with open(stored, "rb") as f, lzma.open(packed, "wb", preset=9) as out:
        shutil.copyfileobj(f, out)
    os.remove(stored)
    return packed


def prepare(folder, python_version="3.12", also=()):
    """Download WHEELS (and `also`, more requirements) for the GPU image's Python (binary wheels for manylinux
    x86_64), EasyOCR's with its English character list only, each packed by `pack_wheel` into FOLDER/wheels, and
    EasyOCR's English recogniser, xz-compressed, into FOLDER. Returns `check_carry`'s line; raises SystemExit if
    the carried total leaves less than SPARE_MIB of LIMIT_MIB."""
    import easyocr_en_models

    wheels = os.path.join(folder, "wheels")
    os.makedirs(wheels, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crd-wheels-") as download:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python_version, "--implementation", "cp", *platforms, "-d", download,
                        *WHEELS, *also], check=True)
        for name in sorted(os.listdir(download)):
            if name.startswith("easyocr-"):
                english_only(os.path.join(download, name))
            pack_wheel(os.path.join(download, name), wheels)
    with open(os.path.join(easyocr_en_models.model_dir(), RECOGNISER), "rb") as f:
        with lzma.open(os.path.join(folder, RECOGNISER + ".xz"), "wb", preset=9) as out:
            shutil.copyfileobj(f, out)
    print(f"{folder}: {len(os.listdir(wheels))} wheels + EasyOCR's recogniser, {folder_mib(folder):.1f} MiB")
    line = check_carry(folder)
    print(line)
    return line


def install(folder, target):
    """pip install FOLDER/wheels/*.whl.xz (and plain *.whl) into `target`, an empty or new folder, offline and
    without dependencies, and unpack the recogniser into TARGET/easyocr_models. Returns (the installed
    distributions as 'name version' strings, the recogniser's folder). Raises SystemExit if `target` is not empty,
    or if pip fails."""
    if os.path.isdir(target) and os.listdir(target):
        raise SystemExit(f"--wheels installs into an empty folder; {target} is not")
    os.makedirs(target, exist_ok=True)
    source = os.path.join(folder, "wheels")
    with tempfile.TemporaryDirectory(prefix="crd-wheels-") as unpacked:
        wheels = []
        for name in sorted(os.listdir(source)):
            if name.endswith(".whl.xz"):
                wheels.append(os.path.join(unpacked, name[:-3]))
                with lzma.open(os.path.join(source, name)) as f, open(wheels[-1], "wb") as out:
                    shutil.copyfileobj(f, out)
            elif name.endswith(".whl"):
                wheels.append(os.path.join(source, name))
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--disable-pip-version-check", "--target", target, *wheels],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"pip install of {len(wheels)} wheels into {target} failed:\n{done.stderr[-3000:]}")
    models = os.path.join(target, "easyocr_models")
    os.makedirs(models, exist_ok=True)
    packed = os.path.join(folder, RECOGNISER + ".xz")
    if os.path.isfile(packed):
        with lzma.open(packed) as f, open(os.path.join(models, RECOGNISER), "wb") as out:
            shutil.copyfileobj(f, out)
    installed = sorted(" ".join(name[:-len(".dist-info")].replace("_", "-").rsplit("-", 1))
                       for name in os.listdir(target) if name.endswith(".dist-info"))
    return installed, models if os.path.isfile(packed) else ""


def versions(env, timeout=180):
    """The versions line (and a warning if peft is older than diffusers needs), from a fresh interpreter with
    `env`: what a part run with that env imports. Never raises: a failure is reported in the line."""
    code = VERSIONS_CODE.replace("NAMES", repr(VERSIONS))
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        return (done.stdout.strip() or f"versions: failed ({done.stderr.strip()[-500:]})").splitlines()
    except subprocess.TimeoutExpired:
        return [f"versions: no answer within {timeout} s"]


# -- the parts ---------------------------------------------------------------------------------------------------
def stop(proc):
    """Kill `proc` and everything it started (it runs in its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_part(cmd, budget, log_path, env, say):
    """Run `cmd` (in ROOT, its own session) for at most `budget` seconds, its output streamed to the console and to
    log_path (and say's log) as it comes. Returns (exit status, or None if stopped at the budget; seconds taken)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                say.write(line)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
        reader.join(timeout=5)
    say(f"(a) {'exit status ' + str(rc) if rc is not None else f'stopped at its budget of {budget:.0f} s'}, "
        f"{time.time() - t0:.0f} s")
    return rc, time.time() - t0


def read_metrics(path):
    """The JSON lines of a metrics.jsonl being written (a torn last line skipped); [] if there is none yet."""
    lines = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return lines


def comparison_table(runs, iterations, device, final=False, eval_count=256):
    """(b)'s Markdown table from runs = {name "variant-sS": {"metrics": metrics.jsonl lines, "status": "done",
    "running", "stopped" or "failed (exit N)"}}: one row per variant with the mean ± std of the held-out reward at
    the latest iteration every run has evaluated (the same for all rows, so they compare), and per seed its last
    evaluation; runs not done are marked (partial). final=False says the table is being written as runs go;
    eval_count: the held-out prompts each evaluation scored (1 to eval_count)."""
    evals = {name: {m["eval/iteration"]: m["eval/reward"] for m in run["metrics"] if "eval/reward" in m}
             for name, run in runs.items()}
    common = set.intersection(*(set(e) for e in evals.values())) if evals else set()
    at = max(common) if common else None
    lines = [f"Tiny OCR task on {device}, {iterations} iterations per run, held-out reward (prompts 1-{eval_count}, "
             "no CFG)"
             + ("" if final else "; written while the runs go, not final") + ":", "",
             f"| variant | runs done | at iteration {at if at is not None else '–'}: mean ± std | per seed: last "
             f"evaluation (iteration), status |", "|---|---|---|---|"]
    for variant in VARIANTS:
        names = [n for n in runs if n.rsplit("-s", 1)[0] == variant]
        values = [evals[n][at] for n in names if at is not None]
        spread = f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}" \
            if values else "–"
        done = sum(runs[n]["status"] == "done" for n in names)
        cells = []
        for n in names:
            last = max(evals[n]) if evals[n] else None
            reward = f"{evals[n][last]:.3f} ({last})" if last is not None else "no evaluation"
            iters = sum("reward/mean" in m for m in runs[n]["metrics"])
            cells.append(f"s{n.rsplit('-s', 1)[1]}: {reward}, {runs[n]['status']}"
                         + ("" if runs[n]["status"] == "done" else f" after {iters} iterations (partial)"))
        partial = "" if done == len(names) else " (partial)"
        lines.append(f"| {variant}{partial} | {done}/{len(names)} | {spread} | " + "; ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_commands(seeds, iterations, device, runs_dir, model_dir=""):
    """{run name: the crd.py command} of (b): every variant x seed of the tiny OCR task."""
    options = ["--reward-options", f"ocr.model_dir={model_dir}"] if model_dir else []
    return {f"{variant}-s{seed}": [sys.executable, "crd.py", "--reward", "ocr", *flags, "--seed", str(seed),
                                   "--iterations", str(iterations), "--eval-rewards", "", "--device", device,
                                   "--output-dir", runs_dir, "--run-name", f"{variant}-s{seed}", "--overwrite",
                                   *options,
                                   *(["--eval-count", str(TINY_EVAL_COUNT)] if device == "cpu" else [])]
            for variant, flags in VARIANTS.items() for seed in seeds}


def tiny_comparison(commands, out, runs_dir, iterations, budget, device, env, say, poll=5.0):
    """(b): the `commands` ({run name: command}, see run_commands) as concurrent processes, each in its own session
    with OMP_NUM_THREADS = cores / runs (at least 1); those not done within `budget` seconds are stopped. Rewrites
    OUT/tiny_ocr.md every `poll` seconds while they run and once at the end, then OUT/tiny_metrics.jsonl; prints
    the last lines of each failed run's log. Returns the final table."""
    env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // len(commands))))
    os.makedirs(runs_dir, exist_ok=True)
    procs, logs, started = {}, {}, time.time()
    for name, cmd in commands.items():
        logs[name] = open(os.path.join(runs_dir, f"{name}.log"), "w")
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[name], stderr=subprocess.STDOUT,
                                       start_new_session=True)
    status = {name: "running" for name in commands}

    def write(final=False):
        runs = {n: {"metrics": read_metrics(os.path.join(runs_dir, n, "metrics.jsonl")), "status": status[n]}
                for n in commands}
        table = comparison_table(runs, iterations, device, final, TINY_EVAL_COUNT if device == "cpu" else 256)
        with open(os.path.join(out, "tiny_ocr.md"), "w") as f:
            f.write(table)
        return table, runs

    while True:
        for name, proc in procs.items():
            if status[name] == "running" and proc.poll() is not None:
                status[name] = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        left = budget - (time.time() - started)
        if all(s != "running" for s in status.values()) or left <= 0:
            break
        write()
        time.sleep(min(poll, max(left, 0.1)))
    for name, proc in procs.items():
        if status[name] == "running":
            stop(proc)
            status[name] = "stopped"
        logs[name].close()
    table, runs = write(final=True)
    with open(os.path.join(out, "tiny_metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"run": n, **m}) + "\n" for n, run in runs.items() for m in run["metrics"])
    for name in commands:
        if status[name].startswith("failed"):
            with open(os.path.join(runs_dir, f"{name}.log")) as f:
                say(f"(b) {name} {status[name]}; its log ends:", *f.read().splitlines()[-15:])
    say(f"(b) {sum(s == 'done' for s in status.values())}/{len(status)} runs done, {time.time() - started:.0f} s")
    return table


def main(argv=None):
    """--prepare / --check-size, or the check itself: versions, the install (--wheels), (a), (b) (module docstring).
    Returns None; raises SystemExit for a failed install or a carried total over its limit."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", metavar="FOLDER", help="download what the GPU image lacks into FOLDER, then stop")
    parser.add_argument("--python", default="3.12", help="--prepare: the GPU image's Python version")
    parser.add_argument("--also", action="append", default=[], metavar="NAME==VERSION",
                        help="--prepare: one more wheel to carry (e.g. peft==0.21.2 for an image with an old peft)")
    parser.add_argument("--check-size", metavar="FOLDER", help="check the carried total with FOLDER, then stop")
    parser.add_argument("--wheels", metavar="FOLDER", help="install FOLDER's wheels (offline) before running")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"),
                        help="the few files that report (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--work", default="", help="scratch folder for the installed wheels (site/) and (b)'s runs "
                                                   "(default: a new temporary folder)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=150, help="(b): iterations per run (tiny scale: 2)")
    parser.add_argument("--budget-a", type=float, default=270, help="(a): seconds, then it is stopped")
    parser.add_argument("--budget-b", type=float, default=210, help="(b): seconds for all its runs together")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare, args.python, args.also)
    if args.check_size:
        return print(check_carry(args.check_size))
    full, env = args.scale == "full", dict(os.environ, PYTHONUNBUFFERED="1")
    os.makedirs(args.out, exist_ok=True)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="crd-gpu-check-"))
    say = Console(os.path.join(args.out, "gpu_check.log"))
    t0 = time.time()
    say(*versions(env))
    model_dir = ""
    if args.wheels:
        site = os.path.join(work, "site")
        installed, model_dir = install(args.wheels, site)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
        say(f"installed into {site} ({time.time() - t0:.0f} s): " + ", ".join(installed), *versions(env))
    bench = [sys.executable, "bench/full_size.py", "--scale", args.scale, "--iterations", "2"]
    bench += ["--prompts-per-iteration", "1", "--eval-count", "8"] if full else []
    say("(a) " + " ".join(bench[1:]) + f" (budget {args.budget_a:.0f} s)")
    run_part(bench, args.budget_a, os.path.join(args.out, "full_size.log"), env, say)
    seeds = [int(s) for s in args.seeds.split(",")] if full else [0]
    iterations, device = (args.iterations, "cuda") if full else (2, "cpu")
    commands = run_commands(seeds, iterations, device, os.path.join(work, "tiny"), model_dir)
    say(f"(b) {len(commands)} runs of the tiny OCR task on {device}, {iterations} iterations each (budget "
        f"{args.budget_b:.0f} s); table in {os.path.join(args.out, 'tiny_ocr.md')}")
    say(tiny_comparison(commands, args.out, os.path.join(work, "tiny"), iterations, args.budget_b, device, env, say))
    say(f"total {time.time() - t0:.0f} s; scratch folder {work}")


if __name__ == "__main__":
    main()
