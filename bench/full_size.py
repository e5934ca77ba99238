"""Seconds per iteration and peak GPU memory of the `sd35m_ocr` recipe at full size, with random weights.

Builds SD3.5-M's transformer, VAE and three text encoders from the public configurations in bench/sd35m_configs/
(architecture only: no weights are shipped or downloaded), saves the pipeline to a local folder, and runs a few
iterations of `crd.main` with the `sd35m_ocr` preset: the real code path and the real batch sizes (48 prompts x
24 samples, 20 training timesteps, micro-batches of 24, rollouts in chunks of 48; --prompts-per-iteration fewer for
a short check, its per-image and per-pass times scaled to the preset in the last line). The reward is `ink`
(cheap, deterministic) because random weights draw noise, not text; `--reward ocr` adds the OCR engine's time.

    python bench/full_size.py                    # one GPU: SD3.5-M sizes, bf16, 3 iterations
    python bench/full_size.py --scale tiny       # CPU: the same code path with shrunken configs (run by the tests)

Prints, for the iterations after the first (warm-up): seconds per iteration split into rollout / reward /
training / evaluation, images per second, the peak GPU memory, the evaluation timed on --eval-count prompts at the
preset's 40 steps and scaled to the 1,018 OCR test prompts, and the preset's seconds per iteration.
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import crd  # noqa: E402
import plumbing  # noqa: E402
from tools.pretrain_tiny import build_tokenizer  # noqa: E402

CONFIGS = os.path.join(HERE, "sd35m_configs")
TINY = {  # --scale tiny: the same components, each shrunk to a few layers of small width
    "transformer": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16, sample_size=16,
                        dual_attention_layers=[0]),
    "vae": dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         projection_dim=32),
    "text_encoder_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           projection_dim=32),
    "text_encoder_3": dict(d_model=64, d_ff=64, d_kv=16, num_layers=1, num_heads=2),
}
PROMPTS = ['a sign that says "crd"', 'a shop window with the text "open late"', 'a poster reading "flow"',
           'a mug printed with "reward"', 'a book cover titled "centered"', 'a neon light spelling "tiny"']


def config(name, scale):
    """One component's public config (bench/sd35m_configs/NAME.json), shrunk for --scale tiny."""
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        values = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "architectures"}
    return values | (TINY.get(name, {}) if scale == "tiny" else {})


def build_pipeline(directory, scale, dtype, device):
    """SD3.5-M's layout with random weights, saved to `directory` with save_pretrained (loaded back by crd.main)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config
    from transformers import T5EncoderModel

    clip_tokenizer = build_tokenizer(os.path.join(directory, "clip_tokenizer"), max_length=77)
    words = ["<pad>", "</s>", "<unk>"] + sorted({w for p in PROMPTS for w in p.split()})
    t5_backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t5_backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t5_tokenizer = PreTrainedTokenizerFast(tokenizer_object=t5_backend, pad_token="<pad>", eos_token="</s>",
                                           unk_token="<unk>", model_max_length=256)
    special = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                   pad_token_id=clip_tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation where the weights will live (fast on a GPU)
        components = dict(
            transformer=SD3Transformer2DModel(**config("transformer", scale)),
            vae=AutoencoderKL(**config("vae", scale)),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder", scale), **special)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2", scale), **special)),
            text_encoder_3=T5EncoderModel(T5Config(**config("text_encoder_3", scale))))
    components = {k: v.to(dtype) for k, v in components.items()}
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**config("scheduler", scale)),
                                    tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, tokenizer_3=t5_tokenizer,
                                    **components)
    pipe.save_pretrained(directory)
    return sum(p.numel() for p in components["transformer"].parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--iterations", type=int, default=3, help="the first one is reported as warm-up")
    parser.add_argument("--eval-count", type=int, default=48, help="evaluation prompts timed (40 steps each)")
    parser.add_argument("--reward", default="ink", help="ink (cheap, the default) or ocr (adds EasyOCR's time)")
    parser.add_argument("--prompts-per-iteration", type=int, default=48,
                        help="prompts per iteration at full scale (48: the preset; fewer for a short check, scaled "
                             "to the preset's 48 in the last line)")
    parser.add_argument("--workdir", default="", help="where the random pipeline is saved (default: a temp folder)")
    args = parser.parse_args(argv)
    full = args.scale == "full"
    device = plumbing.pick_device("auto")
    if full and device.type != "cuda":
        raise SystemExit("bench/full_size.py: the full scale needs a CUDA GPU (SD3.5-M in bf16); use --scale tiny")
    with tempfile.TemporaryDirectory(prefix="crd-full-size-") as scratch:  # ~16 GB at full size: removed after
        return run(args, args.workdir or scratch, full, device)


def run(args, workdir, full, device):
    """Build the pipeline in `workdir`, run crd.main on it and print the measurements; returns the metrics."""
    model = os.path.join(workdir, "pipeline")
    t0 = time.time()
    n_params = build_pipeline(model, args.scale, torch.bfloat16 if full else torch.float32, device)
    print(f"built {args.scale} SD3.5-M layout (transformer {n_params / 1e9:.2f} B parameters) in {model}, "
          f"{time.time() - t0:.0f}s")
    prompts = os.path.join(workdir, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(PROMPTS * 8) + "\n")  # 48 prompts: one iteration of the preset draws each once
    sizes = dict(prompts_per_iteration=args.prompts_per_iteration) if full else dict(
        height=32, width=32, max_sequence_length=4, prompts_per_iteration=2, group_size=2, micro_batch_size=2,
        sample_batch_size=4, num_steps=3, train_timesteps=2, eval_num_steps=2, lora_rank=4, lora_alpha=8,
        mixed_precision="no")
    cfg = dataclasses.replace(crd.sd35m_ocr(), model=model, prompts=prompts, eval_prompts=prompts,
                              eval_count=args.eval_count if full else 2, eval_every=0, eval_rewards="",
                              reward=args.reward, iterations=args.iterations, output_dir=workdir,
                              run_name="bench", sample_every=10**6, overwrite=True,
                              **sizes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    metrics = crd.main(cfg)
    timed = metrics[1:] or metrics
    mean = {k: sum(m.get(f"time/{k}", 0.0) for m in timed) / len(timed) for k in plumbing.TIME_PARTS + ("iteration",)}
    images = cfg.prompts_per_iteration * cfg.group_size
    eval_time = metrics[0].get("time/eval", 0.0)  # iteration 0 starts with an evaluation of eval_count prompts
    train_parts = {k: mean[k] for k in ("sample", "reward", "train", "other")}
    print(f"{args.scale} scale on {device}: {images} images per iteration, {len(timed)} timed iteration(s)")
    print("seconds per iteration (no evaluation): " + ", ".join(f"{k} {v:.1f}" for k, v in train_parts.items())
          + f"; total {sum(train_parts.values()):.1f} s, {images / max(sum(train_parts.values()), 1e-9):.2f} "
          f"images/s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved")
    print(f"evaluation: {eval_time:.1f} s for {cfg.eval_count} prompts at {cfg.eval_num_steps} steps "
          f"(x{1018 / cfg.eval_count:.1f} = {eval_time * 1018 / cfg.eval_count:.0f} s for the 1,018 OCR test prompts)")
    preset, passes = crd.sd35m_ocr(), cfg.sizes().passes
    scaled = ((mean["sample"] + mean["reward"]) * preset.prompts_per_iteration * preset.group_size / images
              + mean["train"] * preset.sizes().passes / passes)
    print(f"per image: rollout {mean['sample'] / images:.3f} s, reward {mean['reward'] / images:.3f} s; per training "
          f"pass of {cfg.micro_batch_size}: {mean['train'] / passes:.3f} s -> the preset's iteration "
          f"({preset.prompts_per_iteration * preset.group_size} images, {preset.sizes().passes} passes) on one such "
          f"device: ~{scaled:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
