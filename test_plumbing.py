"""Tests of plumbing.py, what is not CRD: config checks and the command line's one-line errors, checkpoints and
resume, signals, held-out evaluation's seed contract, trackers, torchrun, and the one-way import rule."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from PIL import Image

import crd
import geneval
import plumbing
import reward
from conftest import ROOT, run_cli, tiny_config


# ---------------------------------------------------------------------------------------------------------------
# Config checks and the command line
# ---------------------------------------------------------------------------------------------------------------
def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="group-size 1"):
        plumbing.check_config(dataclasses.replace(crd.Config(), group_size=1))
    with pytest.raises(ValueError, match="not a multiple of --group-size"):
        plumbing.check_config(dataclasses.replace(crd.Config(), micro_batch_size=12))
    with pytest.raises(ValueError, match="optimizer steps"):
        plumbing.check_config(dataclasses.replace(crd.Config(), train_timesteps=1, optimizer_steps_per_iteration=4))
    plumbing.check_config(crd.Config())
    plumbing.check_config(crd.sd35m_ocr())


def test_check_inputs_rejects_unknown_reward_and_unquoted_prompts(tmp_path):
    with pytest.raises(ValueError, match="known rewards: .*ocr"):
        plumbing.check_inputs(dataclasses.replace(crd.Config(), reward="aesthetic"))
    bad = tmp_path / "prompts.txt"
    bad.write_text('"abc"\nno quotes here\n')
    with pytest.raises(ValueError, match="prompt 2"):
        plumbing.check_inputs(dataclasses.replace(crd.Config(), prompts=str(bad)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        plumbing.check_inputs(dataclasses.replace(crd.Config(), prompts=str(empty)))


def test_cli_exposes_every_config_field():
    cfg, _ = plumbing.parse_args(crd.Config, crd.PRESETS, ["--group-size", "4", "--no-adaptive-kl", "--beta", "0.5"])
    assert (cfg.group_size, cfg.adaptive_kl, cfg.beta) == (4, False, 0.5)
    cfg, _ = plumbing.parse_args(crd.Config, crd.PRESETS, ["--preset", "sd35m_ocr"])
    assert (cfg.group_size, cfg.prompts_per_iteration, cfg.height) == (24, 48, 512)
    assert all(f.metadata["help"] for f in dataclasses.fields(crd.Config))  # every flag has a --help text


@pytest.mark.parametrize("preset", sorted(crd.PRESETS))
def test_help_prints_and_exits_zero_for_every_preset(preset):
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(crd.__file__), "crd.py"), "--preset", preset,
                          "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--group-size" in out.stdout and "Traceback" not in out.stderr


def test_bad_inputs_fail_before_loading_with_a_clear_message(tmp_path):
    base = crd.Config()
    cases = [
        (dict(prompts=str(tmp_path / "missing.txt")), crd.InputError, "does not exist"),
        (dict(model=str(tmp_path)), crd.InputError, "no model_index.json"),
        (dict(learning_rate=-1.0), crd.InputError, "--learning-rate -1.0 must be > 0"),
        (dict(iterations=0), crd.InputError, "--iterations 0 must be > 0"),
        (dict(sampler_decay="75-0-0.0075-1.5"), crd.InputError, "--sampler-decay EMA decay schedule '75-0-0.0075-1.5'"),
        (dict(old_decay="0.25"), crd.InputError, "write DELAY-START-RATE-MAX"),
        (dict(eval_rewards="ppocr,nope"), crd.InputError, "unknown reward 'nope'"),
        (dict(timestep_range=0.5, train_timesteps=6), ValueError, "train-timesteps 6"),
        (dict(centering="global"), ValueError, "choose one of prompt, batch"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            plumbing.check_inputs(dataclasses.replace(base, **overrides))
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        plumbing.check_config(base, world_size=3)
    with pytest.raises(ValueError, match="no prompt file: pass --prompts"):  # SD3.5-M ships no training prompts
        plumbing.check_inputs(crd.sd35m_ocr())
    assert plumbing.check_inputs(crd.sd35m_ocr(), training=False)[1][0].count('"') == 2  # --eval needs none
    plumbing.check_model("stabilityai/stable-diffusion-3.5-medium")  # a hub id is not checked as a folder
    with pytest.raises(crd.InputError, match="no such checkpoint"):
        crd.main(dataclasses.replace(base, resume=str(tmp_path / "nope.pt"), output_dir=str(tmp_path)))


def test_non_finite_values_large_seeds_other_devices_and_unknown_lora_targets_fail_before_loading(tmp_path):
    """inf and nan fail every range check, a seed whose generators would pass 2**63, a device CRD does not run on
    and a --lora-targets name that matches no layer (peft would skip it, or fail after loading) are refused."""
    base = tiny_config(tmp_path)
    cases = [(dict(learning_rate=math.inf), "--learning-rate inf must be a finite number > 0"),
             (dict(beta=math.nan), "--beta nan must be a finite number > 0"),
             (dict(kl_beta=math.inf), "--kl-beta inf must be a finite number >= 0"),
             (dict(reward="ink:inf"), "must be a finite number > 0"),
             (dict(seed=20_000_000_000), "--seed 20000000000 is too large"),
             (dict(lora_targets="attn.nonexistent"), "'attn.nonexistent' matches no layer"),
             (dict(lora_targets="attn.to_q,attn.nope"), "'attn.nope' matches no layer"),
             (dict(lora_targets=""), "'' matches no layer")]
    for overrides, message in cases:
        with pytest.raises(crd.InputError, match=re.escape(message)):
            plumbing.check_inputs(dataclasses.replace(base, **overrides))
    largest = crd.max_seed(base.iterations)
    plumbing.check_config(dataclasses.replace(base, seed=largest))
    crd.iteration_generators(largest, base.iterations - 1, 0)  # the largest seed allowed still seeds
    for name, message in (("xpu", "xpu is not supported"), ("meta", "meta holds no data")):
        with pytest.raises(crd.InputError, match=message):
            plumbing.pick_device(name)


def test_prompt_files_drop_a_byte_order_mark_and_ambiguous_quotes_warn_naming_the_prompt(tmp_path, capsys):
    bom = tmp_path / "bom.txt"
    bom.write_bytes('"ynbi"\n"abc"\n'.encode("utf-8-sig"))
    assert plumbing.read_prompts(str(bom)) == ['"ynbi"', '"abc"']
    quotes = tmp_path / "quotes.txt"
    quotes.write_text('"abc"\n"say "hi" now"\n')
    plumbing.check_inputs(tiny_config(tmp_path, reward="ocr", prompts=str(quotes), eval_prompts=str(quotes),
                                      eval_rewards="ppocr", prompts_per_iteration=2))
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: {quotes}: prompt 2: 4 double quotes in '\"say \"hi\" now\"': the OCR target is the "
                     f"text between the first two, 'say '; quote only the text to render"] * 2  # training, held-out


def test_command_line_input_errors_print_one_line_and_no_traceback(tmp_path):
    """Each mistake a user can make on the command line exits 2 with a line naming it, before any model loads."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes('"caf\xe9"\n'.encode("latin-1"))
    corrupt = tmp_path / "corrupt_lora"
    corrupt.mkdir()
    (corrupt / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    foreign = tmp_path / "foreign_lora"
    foreign.mkdir()
    safetensors.torch.save_file({"unet.down.lora_A.weight": torch.ones(2, 2)},
                                str(foreign / "pytorch_lora_weights.safetensors"))
    cases = [
        (["--height", "33"], "--height 33 is not a multiple of 8"),
        (["--width", "100", "--model", crd.SHAPES_MODEL], "--width 100 is not a multiple of 8"),
        (["--output-dir", str(in_the_way / "runs")], "a_file' is a file"),
        (["--eval", "--lora", str(corrupt)], "pytorch_lora_weights.safetensors is not a readable safetensors file"),
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "torch finds no CUDA device here")]),
        (["--device", "tpu9"], "--device 'tpu9'"),
        (["--preset", "sd35m_ocr"], "Flow-GRPO's dataset/ocr/train.txt"),
        (["--resume", str(garbage)], "garbage.pt: not a readable CRD checkpoint"),
        (["--eval", "--lora", str(tmp_path / "no_such_dir")], "no pytorch_lora_weights.safetensors"),
        (["--prompts", str(latin1)], "latin1.txt' is not UTF-8"),
        (["--learning-rate", "-1"], "--learning-rate -1.0 must be > 0"),
        (["--iterations", "0"], "--iterations 0 must be > 0"),
        (["--model", str(tmp_path)], "no model_index.json"),
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--prompts", str(tmp_path / "missing.txt")], "missing.txt' does not exist"),
        (["--group-size", "1"], "--group-size 1: centring within a prompt needs K >= 2"),
        (["--centering", "global"], "--centering 'global': choose one of prompt, batch"),
        (["--reward-options", "ocr.nope=1"], "ocr takes"),
        (["--eval", "--lora", str(foreign)], "holds no transformer LoRA weights"),
        (["--seed", "20000000000"], "--seed 20000000000 is too large"),
    ]
    for args, message in cases:
        out = run_cli("--output-dir", str(tmp_path / "runs"), *args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert message in out.stderr and "Traceback" not in out.stderr + out.stdout, (args, out.stderr[-2000:])
    offline = run_cli("--eval", "--preset", "sd35m_ocr", "--eval-rewards", "", "--output-dir", str(tmp_path / "runs"),
                      env={"HF_HUB_OFFLINE": "1"})  # a hub id with no network and no cache
    assert offline.returncode == 2 and "cannot load --model 'stabilityai/stable-diffusion-3.5-medium'" in \
        offline.stderr and "HF_HUB_OFFLINE" in offline.stderr and "Traceback" not in offline.stderr
    debug = run_cli("--iterations", "0", env={"CRD_DEBUG": "1"})  # the traceback is there when asked for
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputError" in debug.stderr


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, signals and resume
# ---------------------------------------------------------------------------------------------------------------
def test_resume_refuses_a_changed_algorithm(tmp_path):
    crd.main(tiny_config(tmp_path, iterations=1))
    with pytest.raises(ValueError, match="beta: 1.0 -> 0.5"):
        crd.main(tiny_config(tmp_path, iterations=2, resume="auto", beta=0.5))


def test_checkpoint_write_killed_midway_leaves_previous_checkpoint(tmp_path, monkeypatch):
    params = {"theta": [torch.ones(2)], "old": [torch.zeros(2)], "sampler": [torch.zeros(2)]}
    optimizer = torch.optim.AdamW(params["theta"])
    path, cfg = str(tmp_path / "checkpoint.pt"), crd.Config()
    plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 3, "step": 6})

    def dying_save(obj, file):  # writes half a file, then the process "dies"
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    params["theta"][0].fill_(5.0)
    with pytest.raises(KeyboardInterrupt):
        plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 4, "step": 8})
    monkeypatch.undo()
    assert plumbing.load_checkpoint(path, cfg, params, optimizer) == {"iteration": 3, "step": 6}
    assert params["theta"][0].tolist() == [1.0, 1.0]


def test_checkpoint_with_pickled_code_is_refused_and_a_real_one_loads_weights_only(tmp_path):
    params = {"theta": [torch.ones(2)], "old": [torch.zeros(2)], "sampler": [torch.zeros(2)]}
    optimizer = torch.optim.AdamW(params["theta"])
    params["theta"][0].grad = torch.ones(2)
    optimizer.step()  # a real AdamW state: tensors, numbers, tuples
    cfg, path = crd.Config(), str(tmp_path / "checkpoint.pt")
    plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 1, "step": 1})
    assert plumbing.load_checkpoint(path, cfg, params, optimizer) == {"iteration": 1, "step": 1}
    evil = str(tmp_path / "evil.pt")
    torch.save({"config": {}, "state": {}, "optimizer": {}, "lora": {}, "payload": torch.nn.Linear(1, 1)}, evil)
    with pytest.raises(crd.InputError, match="evil.pt: not a readable CRD checkpoint"):
        plumbing.load_checkpoint(evil, cfg, params, optimizer)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(crd.InputError, match="foreign.pt: not a CRD checkpoint"):
        plumbing.load_checkpoint(foreign, cfg, params, optimizer)


def test_sigint_stops_after_the_iteration_with_a_checkpoint_that_resumes(tmp_path):
    import signal
    flags = ["--reward", "ink", "--run-name", "sig", "--output-dir", str(tmp_path), "--prompts-per-iteration", "2",
             "--group-size", "2", "--micro-batch-size", "2", "--train-timesteps", "1", "--num-steps", "3",
             "--eval-num-steps", "3", "--eval-count", "2", "--eval-every", "0",
             "--lora-rank", "4"]
    command = [sys.executable, os.path.join(os.path.dirname(__file__), "crd.py"), *flags]
    process = subprocess.Popen(command + ["--iterations", "1000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = []
    for line in process.stdout:  # wait for the first finished iteration, then press Ctrl-C
        output.append(line)
        if line.startswith("it   0 |"):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130, "".join(output)  # 128 + SIGINT, as shells expect
    assert "continue with the same command plus --resume auto" in "".join(output)
    done = torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)["state"]["iteration"]
    assert 1 <= done < 1000
    subprocess.run(command + ["--iterations", str(done + 1), "--resume", "auto"], check=True, capture_output=True)
    assert torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)["state"]["iteration"] == done + 1


def test_cli_exits_128_plus_the_signal_after_a_stop_and_at_once_on_a_second(monkeypatch, capsys):
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for signals, code in (([signal.SIGTERM], 143), ([signal.SIGINT], 130), ([signal.SIGTERM, signal.SIGINT], 130)):
            monkeypatch.setattr(plumbing, "STOP_REQUESTED", [])

            def train(cfg):  # the run's end_iteration sees the request and returns
                for signum in signals:
                    os.kill(os.getpid(), signum)

            assert plumbing.cli(train, None, crd.Config, crd.PRESETS, []) == code, signals
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert "stopped at once by SIGINT" in capsys.readouterr().err


def test_a_run_directory_that_holds_a_run_is_never_overwritten_unasked(tmp_path, monkeypatch):
    """Running the same command twice loses nothing: the second refuses with the three ways out (before any model
    loads) and leaves every file as it was; --overwrite replaces the run's own files and no other; a renamed or
    copied run resumes (run name, output folder and logging do not change the computation)."""
    crd.main(tiny_config(tmp_path, iterations=1))
    run = tmp_path / "test"
    (run / "samples_0099.png").write_bytes(b"a grid of an earlier, longer run")
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    load = crd.load_frozen_pipeline
    monkeypatch.setattr(crd, "load_frozen_pipeline", lambda *a: pytest.fail("a model loaded"))
    with pytest.raises(crd.InputError, match=r"holds a run \(checkpoint.pt, metrics.jsonl, lora\): continue it with "
                       "--resume auto, start another with --run-name NAME, or replace it with --overwrite"):
        crd.main(tiny_config(tmp_path, iterations=1))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    with pytest.raises(crd.InputError, match="pass one of them"):
        crd.main(tiny_config(tmp_path, iterations=2, resume="auto", overwrite=True))
    monkeypatch.setattr(crd, "load_frozen_pipeline", load)
    crd.main(tiny_config(tmp_path, iterations=1, overwrite=True, seed=1))
    assert not (run / "samples_0099.png").exists() and (run / "notes.txt").read_text() == "mine"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["seed"] == 1
    import shutil
    shutil.copytree(run, tmp_path / "copy" / "renamed")
    metrics = crd.main(tiny_config(tmp_path / "copy", run_name="renamed", iterations=2, resume="auto", seed=1,
                                   log_to="tensorboard" if importlib.util.find_spec("tensorboard") else ""))
    assert [m["iteration"] for m in metrics] == [0, 1]


def test_a_second_run_into_a_directory_in_use_refuses_at_once_and_a_killed_runs_lock_does_not_block(tmp_path):
    run = tmp_path / "test"
    run.mkdir()
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import plumbing; "
              "plumbing.lock_run_directory(sys.argv[2]); print('locked', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", script, ROOT, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(crd.InputError, match=f"{run} is in use by another run \\(process {holder.pid}\\)"):
            crd.main(tiny_config(tmp_path, iterations=1))
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the lock goes with the process
        holder.wait()
    assert (run / ".lock").exists()
    plumbing.lock_run_directory(str(run))
    plumbing.release_run_directory(str(run))


def test_resume_checkpoints_that_cannot_continue_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Truncated, foreign, of other settings, or already at --iterations: one line each from check_inputs."""
    crd.main(tiny_config(tmp_path, iterations=2))
    good = tmp_path / "test" / "checkpoint.pt"
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"weights": torch.ones(1)}, foreign)
    monkeypatch.setattr(crd, "load_frozen_pipeline", lambda *a: pytest.fail("a model loaded"))
    cases = [(dict(resume=str(truncated)), "truncated.pt: not a readable CRD checkpoint"),
             (dict(resume=str(foreign)), "foreign.pt: not a CRD checkpoint"),
             (dict(resume="auto", lora_rank=8), "lora_rank: 4 -> 8"),
             (dict(resume="auto"), "the checkpoint is at iteration 2, already at or past --iterations 2; nothing to "
                                   "train: pass --iterations N with N > 2")]
    for overrides, message in cases:
        with pytest.raises(crd.InputError, match=re.escape(message)):
            crd.main(tiny_config(tmp_path, iterations=2, **overrides))


def test_a_failed_checkpoint_write_removes_its_tmp_and_says_so_in_one_line(tmp_path, monkeypatch):
    params = {"theta": [torch.ones(2)], "old": [torch.zeros(2)], "sampler": [torch.zeros(2)]}
    optimizer = torch.optim.AdamW(params["theta"])
    path, cfg = str(tmp_path / "checkpoint.pt"), crd.Config()
    plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 3, "step": 6})

    def file_size_limit(obj, file):  # what `ulimit -f` does to torch.save: part of the file, then an error
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 part")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", file_size_limit)
    with pytest.raises(crd.InputError, match="cannot write the checkpoint .*file write failed.*previous one is intact"):
        plumbing.save_checkpoint(path, cfg, params, optimizer, {"iteration": 4, "step": 8})
    monkeypatch.undo()
    assert not os.path.exists(path + ".tmp")
    assert plumbing.read_checkpoint(path, cfg)["state"] == {"iteration": 3, "step": 6}


def test_unwritable_metrics_and_uncreatable_output_dirs_fail_in_one_line(tmp_path, monkeypatch):
    run = tmp_path / "test"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and mode != "r":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(plumbing, "open", read_only, raising=False)  # what chmod a-w does to a user other than root
    with pytest.raises(crd.InputError, match=r"cannot write .*metrics.jsonl \(Permission denied\); make it writable"):
        plumbing.claim_run_directory(str(run), tiny_config(tmp_path))
    monkeypatch.undo()
    if os.path.isdir("/proc/self"):
        with pytest.raises(crd.InputError, match=r"cannot create the run directory '/proc/no/such' \("):
            plumbing.check_output_dir("/proc/no/such")


def test_eval_refuses_a_lora_none_of_whose_weights_load(tmp_path):
    for name, tensors, message in (
            ("other_model", {"unet.down.lora_A.weight": torch.ones(2, 2)}, "holds no transformer LoRA weights"),
            ("other_layers", {"transformer.nonexistent.lora_A.weight": torch.ones(2, 2),
                              "transformer.nonexistent.lora_B.weight": torch.ones(2, 2)}, "cannot load it")):
        (tmp_path / name).mkdir()
        safetensors.torch.save_file(tensors, str(tmp_path / name / "pytorch_lora_weights.safetensors"))
        with pytest.raises(crd.InputError, match=message):
            plumbing.check_lora(str(tmp_path / name))
            plumbing.load_lora(plumbing.load_pipeline(crd.TINY_MODEL), str(tmp_path / name))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, trackers, torchrun, the one-way import rule
# ---------------------------------------------------------------------------------------------------------------
def test_held_out_evaluation_gives_prompt_i_the_seed_seed_plus_i_whatever_the_batching():
    """plumbing.evaluate: prompt i is drawn with seed `seed + i` in any batch size (every model compared sees the
    same noise), rewards come back in prompt order, the unseen metric scores the very images the reward scored,
    and GenEval tags give per-tag means and their mean."""
    calls = []

    def generate(prompts, seeds):  # an image whose grey level is its seed: the reward can read the seed back
        calls.append(list(seeds))
        return [Image.new("RGB", (4, 4), (s, s, s)) for s in seeds]

    def grey(images, prompts):
        return torch.tensor([image.getpixel((0, 0))[0] / 255 for image in images]), {}

    prompts = [json.dumps({"prompt": f"prompt {i}", "tag": "a" if i < 3 else "b"}) for i in range(5)]
    results = [plumbing.evaluate(generate, grey, prompts, batch_size=size, seed=100, unseen={"grey": grey})
               for size in (2, 5)]
    assert calls == [[100, 101], [102, 103], [104], [100, 101, 102, 103, 104]]
    for result in results:
        assert result["rewards"].tolist() == pytest.approx([s / 255 for s in range(100, 105)])
        assert result["unseen"]["grey"] == pytest.approx(result["reward"]) and result["n"] == 5
        assert result["per_tag"]["a"]["reward"] == pytest.approx(101 / 255)
        assert result["per_tag"]["b"]["reward"] == pytest.approx(103.5 / 255)
        assert result["tag_mean"]["reward"] == pytest.approx((101 + 103.5) / 2 / 255)


def test_log_to_tensorboard_writes_the_metrics_keys_and_the_held_out_grid(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = crd.main(tiny_config(tmp_path, iterations=1, log_to="tensorboard"))
    events = EventAccumulator(str(tmp_path / "test" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"reward/mean", "loss/crd", "eval/reward", "crd/corr"} <= set(events.Tags()["scalars"])
    assert events.Scalars("reward/mean")[0].value == pytest.approx(metrics[0]["reward/mean"])
    assert "eval/grid" in events.Tags()["images"]


RANK_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import crd

recorded, adapters = [], {}
normalize, add_adapters = crd.normalize_rewards, crd.add_lora_adapters
crd.normalize_rewards = lambda rewards, **kw: recorded.append(normalize(rewards, **kw)) or recorded[-1]
crd.add_lora_adapters = lambda *a, **kw: adapters.update(add_adapters(*a, **kw)) or adapters
crd.main(crd.Config(**json.loads(sys.argv[2])))
torch.save({"normalized": recorded, "theta": [p.detach().clone() for p in adapters["theta"]]},
           os.path.join(sys.argv[3], f"rank{os.environ.get('RANK', 'single')}.pt"))
"""


def test_torchrun_two_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cfg = dataclasses.asdict(tiny_config(tmp_path / "out", iterations=2, train_timesteps=2))
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    here, json.dumps(cfg), str(tmp_path)], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run([sys.executable, str(script), here, json.dumps(cfg | {"run_name": "single"}), str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=600)
    rank0, rank1, single = (torch.load(tmp_path / f"rank{r}.pt") for r in ("0", "1", "single"))
    assert all(torch.equal(a, b) for a, b in zip(rank0["theta"], rank1["theta"]))  # gradients were averaged
    # iteration 0: the same prompts and seeds, split over two ranks, give the same centred rewards as one process
    assert torch.allclose(rank0["normalized"][0], single["normalized"][0], atol=1e-4)
    assert torch.equal(rank0["normalized"][0], rank1["normalized"][0])


def test_imports_run_one_way_crd_plumbing_reward_geneval():
    """`python crd.py` runs crd.py as __main__: a plumbing.py that imported crd would load a second copy of it. And
    the modules a fork copies import one way only: crd -> plumbing -> reward -> geneval, so an OCR fork needs no
    geneval.py (reward.py imports it only inside functions, for a GenEval reward); baselines.py and diagnostics.py
    build on crd, which imports them only inside the functions that use them (as `crd`, itself, under __main__)."""
    import ast

    def imports(module, top_level_only=False):
        tree = ast.parse(open(module.__file__).read())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        names = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        return names | {node.module for node in nodes if isinstance(node, ast.ImportFrom)}

    assert "crd" not in imports(plumbing) and "reward" in imports(plumbing)
    assert not {"crd", "plumbing"} & imports(reward) and "geneval" not in imports(reward, top_level_only=True)
    assert not {"crd", "plumbing", "reward"} & imports(geneval)
    assert not {"baselines", "diagnostics"} & imports(crd, top_level_only=True)
    assert {"baselines", "diagnostics"} <= imports(crd) and "sys.modules[\"crd\"]" in open(crd.__file__).read()


def test_every_relative_link_in_readme_and_docs_resolves_to_a_file_in_the_repo():
    """Markdown links [text](target) and images ![alt](target) that are not URLs or anchors must name a file or
    folder of the repository, relative to the page that links them (so a clone can open every one)."""
    import glob
    import re

    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    checked = 0
    for page in pages:
        text = open(page, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert path.startswith(ROOT) and os.path.exists(path), f"{os.path.relpath(page, ROOT)} links {target}"
            checked += 1
    assert checked >= 10


def load_ablate():
    spec = importlib.util.spec_from_file_location("ablate", os.path.join(os.path.dirname(plumbing.__file__), "bench",
                                                                         "ablate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablate_report_aggregation_pairs_prompts_and_spreads_seeds():
    """bench/ablate.py's report: a difference is taken prompt by prompt between the seed averages of two variants
    (NaN prompts dropped), its standard error over prompts; a variant's spread is the sample std over seeds; the
    per-iteration means leave NaNs out."""
    ablate = load_ablate()
    a = [[1.0, 2.0, 3.0, float("nan")], [3.0, 2.0, 1.0, 5.0]]  # seed averages 2, 2, 2, 5
    b = [[1.0, 1.0, 0.0, 0.0]]
    mean, se = ablate.paired(a, b)  # differences 1, 1, 2, 5 (the NaN of one seed leaves the other's value)
    assert mean == pytest.approx(2.25) and se == pytest.approx(statistics.stdev([1, 1, 2, 5]) / 2)
    assert ablate.mean_std([0.6, 0.7, 0.8]) == pytest.approx((0.7, 0.1))
    metrics = [{"crd/corr_fresh": math.nan}, {"crd/corr_fresh": 0.2}, {"crd/corr_fresh": 0.4}, {}]
    assert ablate.mean_over(metrics, "crd/corr_fresh") == pytest.approx(0.3)
    assert ablate.mean_over(metrics, "crd/corr_fresh", 2) == pytest.approx(0.4)
