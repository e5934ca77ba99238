"""Tests of the benchmarks in bench/: the profile's phase accounting and table (bench/profile_phases.py)."""
import math

import pytest
import torch

import crd
from bench import profile_phases as profile
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
