"""Tests of the benchmarks in bench/: the profile's phase accounting and table (bench/profile_phases.py), and the GPU
check's parts (bench/gpu_check.py): what travels, the wheels, the parts' budgets, (b)'s table, --wheels end to end."""
import lzma
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import crd
from bench import gpu_check, profile_phases as profile
from conftest import tiny_config


def test_phases_charge_each_interval_to_the_innermost_open_phase_only():
    ticks, cpu_ticks = iter(range(100)), iter(range(0, 200, 2))
    phases = profile.Phases(clock=lambda: float(next(ticks)), cpu_clock=lambda: float(next(cpu_ticks)))  # 1 s a tick
    phases.switch("timed")                 # t=1 (setup: 0 -> 1)
    phases.enter("train")                  # t=2: loop 1 s
    phases.enter("θ forward")              # t=3: train's own 1 s
    phases.exit()                          # t=4: θ forward 1 s
    with phases.phase("θ backward"):       # t=5: train's own +1 s
        pass                               # t=6: θ backward 1 s
    phases.exit()                          # t=7: train's own +1 s
    assert dict(phases.seconds["timed"]) == {(profile.LOOP, None): 1, ("train", None): 3, ("train", "θ forward"): 1,
                                             ("train", "θ backward"): 1}
    assert phases.seconds["setup"][(profile.LOOP, None)] == 1 and phases.events["timed"]["train"] == 1
    assert phases.cpu["timed"][("train", None)] == 6  # two CPU seconds per wall second: two cores busy
    wrapped = phases.wrap(lambda adapter: adapter * 2, lambda adapter: f"forward {adapter}")
    assert wrapped(3) == 6 and phases.events["timed"]["forward 3"] == 1


def test_table_rows_spread_evaluations_over_iterations_and_compare_with_the_matmul_rate():
    seconds = {("train", None): 2.0, ("train", "θ forward"): 6.0, ("evaluation", "VAE decode"): 30.0,
               ("EMA snapshots (Eq. 8)", None): 1.0}
    flops = {("train", "θ forward"): 30e9, ("evaluation", "VAE decode"): 150e9}
    rows = profile.table_rows(seconds, flops, iterations=2, evaluations=1, matmul_gflops=50.0,
                              evaluations_per_iteration=0.1, cpu={("train", "θ forward"): 9.0})
    by = {r.phase: r for r in rows}
    assert [r.phase for r in rows] == ["train: θ forward", "train: rest", "EMA snapshots (Eq. 8)",
                                       "evaluation: VAE decode"]
    assert by["train: θ forward"].seconds == 3.0 and by["train: θ forward"].gflops == 10.0
    assert by["train: θ forward"].fraction == pytest.approx(0.2)
    assert by["evaluation: VAE decode"].seconds == pytest.approx(3.0)  # 30 s per evaluation, one every 10 iterations
    assert by["evaluation: VAE decode"].gflop == pytest.approx(15.0) and by["evaluation: VAE decode"].gflops == 5.0
    assert by["train: rest"].gflops is None and math.isclose(sum(r.share for r in rows), 1.0)
    assert by["train: θ forward"].share == pytest.approx(3.0 / 7.5)
    table = profile.markdown(rows, 50.0)
    assert by["train: θ forward"].busy == 1.5 and by["train: rest"].busy is None
    assert "| train: θ forward | 3.000 | 40.0% | 30.00 | 10.0 | 20.0% | 1.50 |" in table
    assert "| **total** | **7.500** |" in table and table.count("| – | – |") == 2
    with pytest.raises(ValueError, match="0 evaluations"):
        profile.table_rows(seconds, flops, 2, 0, 50.0, 0.1)
    assert profile.evaluations_per_iteration(crd.tiny_ocr()) == 7 / 150  # iterations 0, 25, ..., 125 and after 150


def test_flop_counter_counts_the_cpu_attention_kernel_and_int8_dynamic_layers():
    q = torch.randn(2, 4, 10, 8)
    with profile.flop_counter_mode() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 10 * 10 * 8)  # q k^T and the weighted sum of v
    layers = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 16)), dtype=torch.qint8)
    lstm = torch.ao.quantization.quantize_dynamic(  # as EasyOCR's recogniser on a CPU (children are converted)
        torch.nn.Sequential(torch.nn.LSTM(8, 6, bidirectional=True, batch_first=True)), dtype=torch.qint8)
    with profile.flop_counter_mode() as counter:
        layers(torch.randn(3, 5, 8))
    assert counter.get_total_flops() == 2 * 15 * 8 * 16
    with profile.flop_counter_mode() as counter:
        lstm(torch.randn(3, 5, 8))
    assert counter.get_total_flops() == 2 * 15 * 2 * 4 * 6 * (8 + 6)  # 2 directions, 4 gates, 15 steps x batch


def test_profile_times_and_counts_every_phase_of_a_short_run(tmp_path):
    """One counted and one timed iteration of a tiny run through the real crd.main, with its wrappers removed after."""
    rollout = crd.rollout
    phases, metrics = profile.run_job(tiny_config(tmp_path, micro_batch_size=4, train_timesteps=2), 1,
                                      counted_prompts=2)
    assert crd.rollout is rollout and len(metrics) == 2 and phases.eval_scale == 2  # 2 of eval_count 4 counted
    timed, counted = phases.seconds["timed"], phases.flops["counted"]
    for key in [("rollout", "transformer forwards (Euler steps)"), ("rollout", "VAE decode"), ("train", "θ forward"),
                ("train", "θ backward"), ("train", "old forward"), ("train", "pretrained forward (cond + uncond)"),
                ("train", "AdamW step"), ("evaluation", "transformer forwards (Euler steps)")]:
        assert timed[key] > 0, key
    assert counted[("train", "pretrained forward (cond + uncond)")] > counted[("train", "old forward")] > 0
    assert ("reward", "ink reward") in timed and phases.events["timed"]["evaluation"] == 1
    assert phases.flops["timed"][("train", "θ forward")] == 0  # the timed iterations run without the counter


# -- bench/gpu_check.py --------------------------------------------------------------------------------------------
def git_repo(path, files):
    """A git repository at `path` with `files` ({relative path: bytes}) committed."""
    for name, size in files.items():
        os.makedirs(os.path.dirname(path / name), exist_ok=True)
        (path / name).write_bytes(b"x" * size)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run(["git", "add", "."], cwd=path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "files"], cwd=path,
                   check=True)


def test_check_carry_counts_what_travels_and_says_what_to_leave_out(tmp_path):
    mib = 2**20
    git_repo(tmp_path, {"crd.py": 2 * mib, "assets/tiny-sd3-shapes/w.bin": 3 * mib})
    (tmp_path / ".gitignore").write_text("prep/\n")
    (tmp_path / "notes.bin").write_bytes(b"x" * mib)  # untracked, not ignored: travels
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "r.xz").write_bytes(b"x" * 2 * mib)
    line = gpu_check.check_carry(tmp_path / "prep", root=tmp_path, limit=13, spare=4)
    assert "= 8.0 MiB of 13; 5.0 MiB to spare" in line  # 2 + 3 + 1 untracked (+ .gitignore) + 2 prepared
    with pytest.raises(SystemExit) as stopped:
        gpu_check.check_carry(tmp_path / "prep", root=tmp_path, limit=11, spare=4)
    message = str(stopped.value)
    assert "Leave out 1.0 MiB" in message and "notes.bin (untracked) 1.0 MiB" in message
    with pytest.raises(SystemExit) as stopped:
        gpu_check.check_carry(tmp_path / "prep", root=tmp_path, limit=9, spare=4)
    assert "assets/tiny-sd3-shapes (not used by this check) 3.0 MiB" in str(stopped.value)


def test_gpu_check_part_runs_within_its_budget_and_reports_a_failure(tmp_path):
    say = gpu_check.Console(str(tmp_path / "console.log"))
    rc, seconds = gpu_check.run_part([sys.executable, "-c", "import time; print('started', flush=True); "
                                      "time.sleep(60)"], 2, str(tmp_path / "a.log"), dict(os.environ), say)
    assert rc is None and seconds < 30 and "started" in (tmp_path / "a.log").read_text()
    rc, _ = gpu_check.run_part([sys.executable, "-c", "raise SystemExit(3)"], 30, str(tmp_path / "b.log"),
                               dict(os.environ), say)
    assert rc == 3 and "stopped at its budget" in (tmp_path / "console.log").read_text()


FAKE_RUN = """
import json, os, sys, time
name, mode = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(RUNS, name), exist_ok=True)
with open(os.path.join(RUNS, name, "metrics.jsonl"), "a") as f:
    for i in range(3 if mode == "done" else 1):
        f.write(json.dumps({"iteration": i, "reward/mean": 0.5, "eval/iteration": i, "eval/reward": 0.5 + i / 10})
                + "\\n")
        f.flush()
if mode == "slow":
    time.sleep(60)
sys.exit(1 if mode == "fail" else 0)
"""


def test_tiny_comparison_marks_partial_rows_and_stops_runs_at_its_budget(tmp_path):
    runs, script = tmp_path / "runs", tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN.replace("RUNS", repr(str(runs))))
    commands = {name: [sys.executable, str(script), name, mode] for name, mode in
                [("crd-s0", "done"), ("crd-s1", "done"), ("anchor-only-s0", "slow"), ("nft-s0", "fail")]}
    say = gpu_check.Console(str(tmp_path / "console.log"))
    table = gpu_check.tiny_comparison(commands, str(tmp_path), str(runs), 2, 4, "cpu", dict(os.environ), say,
                                      poll=0.5)
    assert table == (tmp_path / "tiny_ocr.md").read_text() and "not final" not in table
    rows = {line.split(" |")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert "at iteration 0: mean ± std" in table  # the latest iteration every run evaluated
    assert rows["crd"].startswith("| crd | 2/2 | 0.500 ± 0.000 | s0: 0.700 (2), done; s1: 0.700 (2), done |")
    assert "s0: 0.500 (0), stopped after 1 iterations (partial)" in rows["anchor-only (partial)"]
    assert "failed (exit 1)" in rows["nft (partial)"] and "| 0/1 |" in rows["nft (partial)"]
    assert len((tmp_path / "tiny_metrics.jsonl").read_text().splitlines()) == 3 + 3 + 1 + 1
    assert "(b) 2/4 runs done" in (tmp_path / "console.log").read_text()


@pytest.mark.slow
def test_gpu_check_installs_packed_wheels_offline_and_runs_both_parts_at_tiny_scale(tmp_path):
    """--wheels end to end at --scale tiny, offline: a wheel built here (pip, no index) packed as --prepare packs
    them, and the recogniser xz-compressed, installed into an empty scratch folder outside --out; (a) the full-size
    bench at toy size, (b) the three variants, their table; only the report files land in --out."""
    import easyocr_en_models

    project, folder = tmp_path / "probe", tmp_path / "prepared"
    (project / "crd_probe").mkdir(parents=True)
    (project / "crd_probe" / "__init__.py").write_text("VERSION = '0.1'\n")
    (project / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "crd-probe"
        version = "0.1"
        """))
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "-w", str(built), str(project)], check=True, capture_output=True)
    (folder / "wheels").mkdir(parents=True)
    gpu_check.pack_wheel(str(next(built.glob("*.whl"))), str(folder / "wheels"))
    with open(os.path.join(easyocr_en_models.model_dir(), gpu_check.RECOGNISER), "rb") as f:
        (folder / (gpu_check.RECOGNISER + ".xz")).write_bytes(lzma.compress(f.read(), preset=0))
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PIP_NO_INDEX="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--wheels", str(folder), "--scale", "tiny", "--out",
                           str(out), "--work", str(work)], cwd=os.path.dirname(crd.__file__), capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("versions: python ") and " peft " in lines[0] and " accelerate " in lines[0]
    assert lines[1].startswith(f"installed into {work / 'site'}") and "crd-probe 0.1" in lines[1]
    assert (work / "site" / "crd_probe" / "__init__.py").is_file()
    assert (work / "site" / "easyocr_models" / gpu_check.RECOGNISER).is_file()
    assert sorted(os.listdir(out)) == ["full_size.log", "gpu_check.log", "tiny_metrics.jsonl", "tiny_ocr.md"]
    assert "the preset's iteration" in (out / "full_size.log").read_text()
    table = (out / "tiny_ocr.md").read_text()
    for variant in ("crd", "anchor-only", "nft"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {variant} |"))
        assert "| 1/1 |" in row and "done" in row and "partial" not in row, table
    config = torch.load(work / "tiny" / "crd-s0" / "checkpoint.pt", weights_only=False)["config"]
    assert config["reward_options"] == f"ocr.model_dir={work / 'site' / 'easyocr_models'}"  # the unpacked recogniser
