"""Pretrain an embedded base model: a tiny SD3 pipeline that CRD fine-tunes on a CPU (text or shapes world).

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
rectified-flow loss of docs/method.md Eqs. (1)-(2) (logit-normal sigma, 10 % prompt dropout so that CFG works);
(5) every --eval-every steps from --eval-from on, score the model on the validation targets (10 Euler steps, no
CFG, OCR reward) and keep a copy; (6) save the copy of step --keep-step (5,750 by default, the shipped model; the
run stops there), or with --keep-step 0 the copy whose validation reward is closest to --target-reward, with
save_pretrained, to --out. --snapshot-dir also saves every copy, to compare candidate bases afterwards.

    python tools/pretrain_tiny.py                  # ~30 min on 2 CPU cores; writes assets/tiny-sd3-text

--world shapes makes the GenEval task's model instead, with the same architecture at 64x64: images are scenes of
tools/shapes_world.py drawn for the prompts of data/tiny_geneval/train.jsonl (written in step 1 by
`make_prompt_lists`), prompts are the scenes' GenEval metadata lines (their "prompt" text is encoded by a
word-level tokenizer, one token per word: 10 at most), validation scores the GenEval partial credit of
`geneval.geneval_shapes_reward`, and the model goes to assets/tiny-sd3-shapes. Its default --keep-step is 3,500, the
step of the shipped model (a run with --eval-from 1000 --eval-every 500 --snapshot-dir, stopped by hand after
step 3,500: ~30 min on 2 cores; its log is assets/tiny-sd3-shapes/pretrain_log.json).

    python tools/pretrain_tiny.py --world shapes   # writes assets/tiny-sd3-shapes and data/tiny_geneval
"""
import argparse
import copy
import functools
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
import plumbing  # noqa: E402
from reward import make_reward  # noqa: E402

HEIGHT, WIDTH = 32, 96  # the text world; the shapes world is 64 x 64
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


def build_word_tokenizer(directory, words, max_length):
    """A word-level tokenizer (`tokenizers` WordLevel, whitespace split, <bos> ... <eos> added; a
    PreTrainedTokenizerFast with CLIP's special tokens), saved to `directory`: one token per word of `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    vocab = {token: i for i, token in enumerate(special + sorted(set(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                             special_tokens=[(t, vocab[t]) for t in special[:2]])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special[0], eos_token=special[1],
                                   pad_token=special[1], unk_token=special[2], model_max_length=max_length)
    fast.save_pretrained(directory)
    return fast


def build_pipeline(tokenizer_dir, height=HEIGHT, max_length=9, words=None):
    """The untrained tiny StableDiffusion3Pipeline, from configs only (sizes in the module docstring); images of
    `height` pixels (sets the VAE's and transformer's sample sizes); prompts of up to max_length - 2 tokens: one
    per character (CLIPTokenizer, no merges), or with `words` one per word (`build_word_tokenizer`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = (build_word_tokenizer(tokenizer_dir, words, max_length) if words  # shapes: <bos> 10 words <eos>
                 else build_tokenizer(tokenizer_dir, max_length=max_length))  # text: <bos> " 5 letters " <eos>
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                                 projection_dim=64, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(text_config), CLIPTextModelWithProjection(text_config)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=height)
    transformer = SD3Transformer2DModel(sample_size=height // 2, patch_size=4, in_channels=4, out_channels=4,
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


def text_world(args):
    """Step (1) of the text world: write data/tiny_ocr/{train,val,heldout}.txt (disjoint random targets, in double
    quotes) and render the training targets. Returns (train prompts, val prompts, uint8 pixels (N, 32, 96, 3))."""
    from PIL import ImageFont
    import numpy as np

    train, val, heldout = make_targets(args.seed, args.n_train, 128, 512)
    os.makedirs(args.data_dir, exist_ok=True)
    for name, items in (("train", train), ("val", val), ("heldout", heldout)):
        with open(os.path.join(args.data_dir, f"{name}.txt"), "w") as f:
            f.write("".join(f'"{t}"\n' for t in items))
    font = ImageFont.truetype(font_path(), 20)
    pixels = np.stack([np.asarray(render(t, font)) for t in tqdm(train, desc="render", mininterval=5)])
    return [f'"{t}"' for t in train], [f'"{t}"' for t in val], pixels


def shapes_world(args):
    """Step (1) of the shapes world: write data/tiny_geneval/{train,val,heldout}.jsonl (`make_prompt_lists`) and
    draw --n-train scenes, each for a random line of the training list. Returns (the scenes' prompts as JSON
    metadata lines, the val list's lines, uint8 pixels (N, 64, 64, 3))."""
    import random

    import numpy as np
    from tools.shapes_world import make_prompt_lists, render as render_scene, scene_for

    lists = make_prompt_lists(args.seed)
    os.makedirs(args.data_dir, exist_ok=True)
    for name, lines in lists.items():
        with open(os.path.join(args.data_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in lines)
    rng = random.Random(args.seed)
    chosen = [rng.choice(lists["train"]) for _ in range(args.n_train)]
    pixels = np.stack([np.asarray(render_scene(scene_for(m, rng))) for m in tqdm(chosen, desc="render",
                                                                                 mininterval=5)])
    return [json.dumps(m) for m in chosen], [json.dumps(m) for m in lists["val"]], pixels


def shapes_words():
    """Every word of the shapes world's prompts (its vocabulary: 25 words)."""
    from tools.shapes_world import all_prompts

    return sorted({word for items in all_prompts().values() for m in items for word in m["prompt"].split()})


WORLDS = {"text": {"height": HEIGHT, "width": WIDTH, "max_length": 9, "words": None, "data": text_world,
                   "reward": "ocr",
                   "out": os.path.join(ROOT, "assets", "tiny-sd3-text"),
                   "data_dir": os.path.join(ROOT, "data", "tiny_ocr"), "keep_step": 5750},
          "shapes": {"height": 64, "width": 64, "max_length": 12, "words": shapes_words(), "data": shapes_world,
                     "reward": "geneval_shapes",
                     "out": os.path.join(ROOT, "assets", "tiny-sd3-shapes"),
                     "data_dir": os.path.join(ROOT, "data", "tiny_geneval"), "keep_step": 3500}}


def parse_args(argv=None):
    """The command line, with the world's defaults filled in (--out, --data-dir, --keep-step); exits with a message
    for a --keep-step that is no validated step."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="text", choices=sorted(WORLDS), help="what the model draws")
    parser.add_argument("--out", default="", help="where the pipeline goes (default: the world's assets/ folder)")
    parser.add_argument("--data-dir", default="", help="where the prompt lists go (default: the world's data/)")
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
    parser.add_argument("--keep-step", type=int, default=-1,
                        help="keep this validated step and stop there (0: keep the one closest to --target-reward; "
                             "default: the shipped model's step of the world)")
    args = parser.parse_args(argv)
    world = WORLDS[args.world]
    args.out = args.out or world["out"]
    args.data_dir = args.data_dir or world["data_dir"]
    args.keep_step = world["keep_step"] if args.keep_step < 0 else args.keep_step
    if args.keep_step and not (args.eval_from <= args.keep_step <= args.steps
                               and (args.keep_step - args.eval_from) % args.eval_every == 0):
        parser.error(f"--keep-step {args.keep_step} is not a validated step: use {args.eval_from} + a multiple of "
                     f"--eval-every {args.eval_every}, at most --steps {args.steps}")
    return args


def standardized_latents(vae, images):
    """Step (3): encode the images (N, 3, H, W) with the trained VAE (posterior modes) and write their mean and
    1 / std into its config as shift_factor / scaling_factor (the pipeline un-does this before decoding). Returns
    (the standardised latents (N, 4, H / 2, W / 2), shift, scale)."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (latents - shift) * scale, shift, scale


def flow_step(pipe, optimizer, warmup, latents, train_prompts, batch_size, generator):
    """One step of step (4): a batch of latents with 10 % of its prompts dropped (for CFG), the rectified-flow loss
    (docs/method.md Eqs. 1-2, logit-normal sigma) of the transformer and both text encoders, an AdamW step. Returns
    the loss."""
    index = torch.randint(len(latents), (batch_size,), generator=generator)
    prompts = ["" if torch.rand((), generator=generator) < 0.1 else train_prompts[i] for i in index.tolist()]
    x0 = latents[index]
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator)).view(-1, 1, 1, 1)  # logit-normal
    x_sigma = (1 - sigma) * x0 + sigma * eps  # Eq. (1)
    embeds, pooled = plumbing.encode_prompts(pipe, prompts, MAX_SEQUENCE_LENGTH)
    v = pipe.transformer(hidden_states=x_sigma, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds,
                         pooled_projections=pooled, return_dict=False)[0]
    loss = F.mse_loss(v, eps - x0)  # Eq. (2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    warmup.step()
    return loss


def validate(pipe, world, reward_fn, val_prompts, step, started):
    """Step (5): score the model on the validation prompts (10 Euler steps, no CFG, seeds 10,000 + i), print it.
    Returns the history entry of `step`."""
    images_for = functools.partial(plumbing.generate, pipe, height=world["height"], width=world["width"],
                                   num_steps=10, max_sequence_length=MAX_SEQUENCE_LENGTH)
    result = plumbing.evaluate(images_for, reward_fn, val_prompts, seed=10_000)
    entry = {"step": step, "val_reward": result["reward"], "val_exact": result["exact"],
             "seconds": round(time.time() - started)} | result["tag_mean"]
    print(f"step {step}: validation {world['reward']} reward {result['reward']:.3f} "
          f"(exact {result['exact']:.3f}{''.join(f', {k} {v:.3f}' for k, v in result['tag_mean'].items())}) "
          f"at {time.time() - started:.0f}s", flush=True)
    return entry


def train_transformer(pipe, latents, train_prompts, val_prompts, reward_fn, world, args, generator, started):
    """Steps (4)-(5): train transformer + text encoders (`flow_step`), and every --eval-every steps from --eval-from
    on validate and keep a copy of their weights (also saved to --snapshot-dir); stops at --keep-step (or, with
    --keep-step 0, past --stop-reward). Returns (the modules, the history, {step: the modules' state dicts})."""
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    parameters = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    history, snapshots = [], {}
    for step in (bar := tqdm(range(1, args.steps + 1), desc="transformer", mininterval=5)):
        for m in modules:
            m.train()
        loss = flow_step(pipe, optimizer, warmup, latents, train_prompts, args.batch_size, generator)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step >= args.eval_from and (step - args.eval_from) % args.eval_every == 0:
            for m in modules:
                m.eval()
            history.append(validate(pipe, world, reward_fn, val_prompts, step, started))
            snapshots[step] = [copy.deepcopy(m.state_dict()) for m in modules]
            if args.snapshot_dir:  # a full pipeline per snapshot, to compare candidate bases afterwards
                pipe.save_pretrained(os.path.join(args.snapshot_dir, f"step_{step}"), safe_serialization=True)
            if step == args.keep_step or (not args.keep_step and history[-1]["val_reward"] > args.stop_reward):
                break
    return modules, history, snapshots


def save_selected(pipe, modules, history, snapshots, args, started):
    """Step (6): load the snapshot at --keep-step (where training stopped) or the one closest to --target-reward,
    save the pipeline to --out with pretrain_log.json, and remove the temporary tokenizer folder."""
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


def main(argv=None):
    args = parse_args(argv)
    world = WORLDS[args.world]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()

    # (1) prompt lists: train (pretraining and CRD training), validation (checkpoint selection), held-out (reports)
    train_prompts, val_prompts, pixels = world["data"](args)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]

    # (2) VAE
    tokenizer_dir = os.path.join(args.out + ".tmp", "tokenizer")
    pipe = build_pipeline(tokenizer_dir, world["height"], world["max_length"], world["words"])
    train_vae(pipe.vae, images, args.vae_steps, args.batch_size, args.lr, generator)
    pipe.vae.eval().requires_grad_(False)

    # (3) latents, standardised through the VAE config
    latents, shift, scale = standardized_latents(pipe.vae, images)
    reward_fn = make_reward(world["reward"])  # how well it scores the VAE's reconstructions bounds later rewards
    check = reward_fn(plumbing.decode_latents(pipe, latents[:64]), train_prompts[:64])[0].mean()
    print(f"vae reconstructions: {world['reward']} reward {check:.3f} on 64 training images", flush=True)
    print(f"vae done at {time.time() - started:.0f}s; latent shift {shift:.4f} scale {scale:.4f}", flush=True)

    # (4)-(5) transformer + text encoders, validation and snapshots; (6) the kept snapshot
    modules, history, snapshots = train_transformer(pipe, latents, train_prompts, val_prompts, reward_fn, world,
                                                    args, generator, started)
    save_selected(pipe, modules, history, snapshots, args, started)


if __name__ == "__main__":
    main()
