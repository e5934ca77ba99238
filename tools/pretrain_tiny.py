"""Pretrain the embedded base model: a tiny SD3 text-rendering pipeline that CRD fine-tunes on a CPU.

Builds a `StableDiffusion3Pipeline` from configs only (no download): two small CLIP text encoders with a locally
built character-level `CLIPTokenizer`, a small `AutoencoderKL` (4 latent channels, downsampling factor 2), an
`SD3Transformer2DModel` (patch 4, 6 layers) and a `FlowMatchEulerDiscreteScheduler` (shift 1.0). No T5: the
pipeline is built with `text_encoder_3=None`, and callers pass `max_sequence_length=2`.

Data: random lowercase strings of 3-5 letters rendered with Pillow in DejaVu Sans Bold 20 px (the copy that
matplotlib ships, so renders are identical everywhere), black on white, 96x32, left-aligned at x = 4. Prompts
are the string in double quotes, e.g. `"qbxe"`, so the OCR reward reads its target from the prompt.

Steps: (1) write the train / validation / held-out target lists (disjoint) to data/tiny_ocr/; (2) train the VAE
on the rendered training images; (3) encode the training set once and write the latent mean / scale into the
VAE config as shift_factor / scaling_factor; (4) train transformer + both text encoders jointly with the
rectified-flow loss of CRD_SPEC.md Eqs. (1)-(2) (logit-normal sigma, 10 % prompt dropout so that CFG works);
(5) every --eval-every steps from --eval-from on, score the model on the validation targets (10 Euler steps, no
CFG, OCR reward) and keep a copy; (6) save the copy of step --keep-step (5,750 by default, the shipped model; the
run stops there), or with --keep-step 0 the copy whose validation reward is closest to --target-reward, with
save_pretrained, to --out. --snapshot-dir also saves every copy, to compare candidate bases afterwards.

    python tools/pretrain_tiny.py                  # ~30 min on 2 CPU cores; writes assets/tiny-sd3-text
"""
import argparse
import copy
import json
import os
import random
import shutil
import string
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import crd  # noqa: E402
from reward import make_reward  # noqa: E402

HEIGHT, WIDTH = 32, 96
MAX_SEQUENCE_LENGTH = 2  # the (absent) T5 encoder's sequence: zeros, kept short
CHARS = string.ascii_lowercase + string.digits + "\"'.,!?-&:"


def font_path():
    """DejaVu Sans Bold as shipped by matplotlib (Bitstream Vera / DejaVu licence: free to use and redistribute)."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")


def render(text, font):
    """Black text on white, 96x32 RGB, left-aligned at x = 4, vertically centred on its ink."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((4 - left, (HEIGHT - (bottom - top)) / 2 - top), text, fill="black", font=font)
    return image


def make_targets(seed, n_train, n_val, n_heldout):
    """Disjoint lists of random lowercase strings of 3-5 letters."""
    rng = random.Random(seed)
    seen, lists = set(), []
    for n in (n_train, n_val, n_heldout):
        items = []
        while len(items) < n:
            text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
            if text not in seen:
                seen.add(text)
                items.append(text)
        lists.append(items)
    return lists


def build_tokenizer(directory, max_length):
    """A character-level CLIPTokenizer: every character is a token (no BPE merges), saved to `directory`."""
    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                         model_max_length=max_length, pad_token="<|endoftext|>")


def build_pipeline(tokenizer_dir):
    """The untrained tiny StableDiffusion3Pipeline, from configs only (sizes in the module docstring)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_tokenizer(tokenizer_dir, max_length=9)  # <bos> " 5 letters " <eos>
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=9,
                                 projection_dim=64, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(text_config), CLIPTextModelWithProjection(text_config)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=HEIGHT)
    transformer = SD3Transformer2DModel(sample_size=HEIGHT // 2, patch_size=4, in_channels=4, out_channels=4,
                                        num_layers=6, attention_head_dim=32, num_attention_heads=4,
                                        joint_attention_dim=128, caption_projection_dim=128,
                                        pooled_projection_dim=128, pos_embed_max_size=16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_vae(vae, images, steps, batch_size, lr, generator):
    """Reconstruction (MSE) + a tiny KL, AdamW; images (N, 3, H, W) in [-1, 1]."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in (bar := tqdm(range(steps), desc="vae", mininterval=5)):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "assets", "tiny-sd3-text"))
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data", "tiny_ocr"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=12000)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=6000, help="transformer steps at most")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-from", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--target-reward", type=float, default=0.35,
                        help="with --keep-step 0: keep the checkpoint closest to this")
    parser.add_argument("--stop-reward", type=float, default=0.55,
                        help="with --keep-step 0: stop once validation reward exceeds this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--snapshot-dir", default="", help="also save every validated snapshot here as step_<n>/")
    parser.add_argument("--keep-step", type=int, default=5750,
                        help="keep this validated step and stop there (0: keep the one closest to --target-reward)")
    args = parser.parse_args()
    if args.keep_step and not (args.eval_from <= args.keep_step <= args.steps
                               and (args.keep_step - args.eval_from) % args.eval_every == 0):
        parser.error(f"--keep-step {args.keep_step} is not a validated step: use {args.eval_from} + a multiple of "
                     f"--eval-every {args.eval_every}, at most --steps {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()

    # (1) targets: train (pretraining and CRD training), validation (checkpoint selection), held-out (reports)
    train, val, heldout = make_targets(args.seed, args.n_train, 128, 512)
    os.makedirs(args.data_dir, exist_ok=True)
    for name, items in (("train", train), ("val", val), ("heldout", heldout)):
        with open(os.path.join(args.data_dir, f"{name}.txt"), "w") as f:
            f.write("".join(f'"{t}"\n' for t in items))
    train_prompts, val_prompts = [f'"{t}"' for t in train], [f'"{t}"' for t in val]

    from PIL import ImageFont
    import numpy as np

    font = ImageFont.truetype(font_path(), 20)
    pixels = np.stack([np.asarray(render(t, font)) for t in tqdm(train, desc="render", mininterval=5)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 32, 96) in [-1, 1]

    # (2) VAE
    tokenizer_dir = os.path.join(args.out + ".tmp", "tokenizer")
    pipe = build_pipeline(tokenizer_dir)
    train_vae(pipe.vae, images, args.vae_steps, args.batch_size, args.lr, generator)
    pipe.vae.eval().requires_grad_(False)

    # (3) latents, standardised through the VAE config (the pipeline un-does this before decoding)
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (latents - shift) * scale  # (N, 4, 16, 48)
    reward_fn = make_reward("ocr")  # how well OCR reads the VAE's reconstructions bounds every later reward
    check = reward_fn(crd.decode_latents(pipe, latents[:64]), train_prompts[:64])[0].mean()
    print(f"vae reconstructions: OCR reward {check:.3f} on 64 training images", flush=True)
    print(f"vae done at {time.time() - started:.0f}s; latent shift {shift:.4f} scale {scale:.4f}", flush=True)

    # (4) transformer + text encoders, rectified flow (CRD_SPEC.md Eqs. 1-2), prompt dropout for CFG
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    parameters = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    history, snapshots = [], {}
    for step in (bar := tqdm(range(1, args.steps + 1), desc="transformer", mininterval=5)):
        for m in modules:
            m.train()
        index = torch.randint(len(latents), (args.batch_size,), generator=generator)
        prompts = ["" if torch.rand((), generator=generator) < 0.1 else train_prompts[i] for i in index.tolist()]
        x0 = latents[index]
        eps = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(len(x0), generator=generator)).view(-1, 1, 1, 1)  # logit-normal
        x_sigma = (1 - sigma) * x0 + sigma * eps  # Eq. (1)
        embeds, pooled = crd.encode_prompts(pipe, prompts, MAX_SEQUENCE_LENGTH)
        v = pipe.transformer(hidden_states=x_sigma, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds,
                             pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)  # Eq. (2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")

        # (5) validation and snapshots
        if step >= args.eval_from and (step - args.eval_from) % args.eval_every == 0:
            for m in modules:
                m.eval()
            result = crd.evaluate(pipe, reward_fn, val_prompts, HEIGHT, WIDTH, num_steps=10,
                                  max_sequence_length=MAX_SEQUENCE_LENGTH, seed=10_000)
            history.append({"step": step, "val_reward": result["reward"], "val_exact": result["exact"],
                            "seconds": round(time.time() - started)})
            print(f"step {step}: validation OCR reward {result['reward']:.3f} (exact {result['exact']:.3f}) "
                  f"at {time.time() - started:.0f}s", flush=True)
            snapshots[step] = [copy.deepcopy(m.state_dict()) for m in modules]
            if args.snapshot_dir:  # a full pipeline per snapshot, to compare candidate bases afterwards
                pipe.save_pretrained(os.path.join(args.snapshot_dir, f"step_{step}"), safe_serialization=True)
            if step == args.keep_step or (not args.keep_step and result["reward"] > args.stop_reward):
                break

    # (6) keep the snapshot at --keep-step (where the loop stopped) or the one closest to the target reward; save it
    best = history[-1] if args.keep_step else min(history, key=lambda h: abs(h["val_reward"] - args.target_reward))
    for m, state in zip(modules, snapshots[best["step"]]):
        m.load_state_dict(state)
    pipe.save_pretrained(args.out, safe_serialization=True)
    shutil.rmtree(args.out + ".tmp", ignore_errors=True)
    with open(os.path.join(args.out, "pretrain_log.json"), "w") as f:
        json.dump({"args": vars(args), "history": history, "selected_step": best["step"],
                   "total_seconds": round(time.time() - started)}, f, indent=1)
    print(f"saved step {best['step']} (validation reward {best['val_reward']:.3f}) to {args.out} "
          f"in {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
