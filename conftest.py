"""Shared helpers of the test files: tiny configs and models, the command line as a subprocess, random tensors.

The tests run on the CPU and offline (HF_HUB_OFFLINE=1): every model is the embedded one or a tiny random one built
from a config.
"""
import dataclasses
import json
import os
import string
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a model hub

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import crd  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_config(tmp_path, **overrides):
    values = dict(run_name="test", output_dir=str(tmp_path), reward="ink", iterations=2, prompts_per_iteration=2,
                  group_size=2, micro_batch_size=2, train_timesteps=1, num_steps=3, eval_num_steps=3, eval_count=4,
                  eval_every=0, sample_every=1, lora_rank=4, lora_alpha=8, learning_rate=1e-2,
                  eval_rewards="")
    values.update(overrides)
    return dataclasses.replace(crd.Config(), **values)


def lora_moved(tensors):
    """True if a LoRA adapter's update B A is non-zero (peft starts B at zero); tensors alternate A, B."""
    return any((b @ a).abs().sum() > 0 for a, b in zip(tensors[::2], tensors[1::2]))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(os.path.dirname(crd.__file__), "crd.py"), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


CHARS = string.ascii_lowercase + string.digits + "\"'.,!?-&:{}[]_"
CLIP_MAX_LENGTH = 64


def build_tokenizer(directory):
    """A character-level CLIPTokenizer (every character a token, no BPE merges), saved to `directory`."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                         model_max_length=CLIP_MAX_LENGTH, pad_token="<|endoftext|>")


def build_clip(directory, seed=0):
    """A tiny random CLIPModel + CLIPProcessor (32x32 images), saved to `directory`; returns (model, processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    build_clip(directory)
    return directory


def image(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def sd35m_layout_pipeline(directory):
    """A tiny random pipeline with SD3.5-M's component layout (two CLIP encoders + T5, a 16-channel VAE, dual-attention
    blocks with RMS qk-norm, a shift-3 scheduler), saved to `directory`: bench/full_size.py's builder at tiny scale."""
    from bench.full_size import build_pipeline

    build_pipeline(str(directory), "tiny", torch.float32, "cpu")
