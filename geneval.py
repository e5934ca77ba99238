"""GenEval for CRD: the benchmark's rules, its detector and colour classifier, and a CPU shapes world.

The rewards here follow reward.py's contract (`fn(images, prompts) -> (rewards (N,) in [0, 1], info)`) and are
registered there (reward.REWARDS), which imports this module only when a GenEval reward is asked for. Nothing
here imports crd.py, plumbing.py or reward.py.

- The rules (pure functions over detections): the benchmark's verdict (djghosh13/geneval) and the partial credit
  Flow-GRPO and DiffusionNFT train on (yifan123/reward-server), `geneval_check`.
- `geneval`: the rules on a transformers Mask2Former detector and a CLIP colour classifier (full-size images).
- `geneval_shapes`, `geneval_shapes_poly`: the rules on two independently built detectors of the shapes world
  (tools/shapes_world.py), the CPU task's reward and its unseen metric.
- The CLIP embedding helpers the colour classifier uses (reward.py's PickScore and CLIPScore use them too).

Heavy imports (transformers, scikit-image, scipy) live inside the functions, so `import geneval` is cheap.
"""
import colorsys
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------------------------
# GenEval rules (pure functions, no models)
#
# The checks of the GenEval benchmark (djghosh13/geneval evaluation/evaluate_images.py, commit af4902f, MIT) and
# the partial-credit score that Flow-GRPO / DiffusionNFT train on (yifan123/reward-server
# reward_server/gen_eval.py), written from their rules. The object detector (Mask2Former) and the CLIP colour
# classifier are not here: the caller passes the detections and a `colour_of(detection)` callable.
# ---------------------------------------------------------------------------------------------------------------
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# CLIP zero-shot prompts of the colour classifier, one classifier per object name: fill with .format(colour=,
# object=). The benchmark averages the three templates' text embeddings per colour (clip_benchmark).
GENEVAL_COLOUR_TEMPLATES = ("a photo of a {colour} {object}", "a photo of a {colour}-colored {object}",
                            "a photo of a {colour} object")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
# The 80 detector classes, in the detector's order (data/geneval/object_names.txt): COCO's names except
# "computer mouse", "tv remote" and "computer keyboard".
GENEVAL_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
GENEVAL_THRESHOLD = 0.3           # keep detections scoring above this ...
GENEVAL_COUNTING_THRESHOLD = 0.9  # ... or above this when the prompt's tag is "counting"
GENEVAL_MAX_OBJECTS = 16          # at most this many detections per class, highest scores first
GENEVAL_MAX_OVERLAP = 1.0         # box-IoU suppression; 1.0 (the benchmark's default) keeps overlapping boxes
GENEVAL_POSITION_MARGIN = 0.1     # centre offsets shrink by this fraction of the two boxes' summed sizes
GENEVAL_CROP_BACKGROUND = (153, 153, 153)  # "#999": the grey behind a masked object given to the colour CLIP


@dataclass(eq=False)
class Detection:
    """One detected object, as the GenEval detector (Mask2Former) reports it (compared by identity).

    label: object name (one of GENEVAL_OBJECTS, or of SHAPES in the shapes world); score: detector confidence in
    [0, 1]; mask: (H, W) bool numpy array, True on the object (H, W: the image's height and width in pixels), or
    None when the detector gives no mask (then the colour crop keeps the whole image inside the box, as the
    benchmark does); box: (x0, y0, x1, y1) in pixels, x to the right and y downwards, x0 <= x1 and y0 <= y1.
    """
    label: str
    score: float
    mask: "np.ndarray | None"
    box: tuple


@dataclass(frozen=True)
class GenEvalResult:
    """Outcome of `geneval_check` for one image.

    correct: the benchmark's binary verdict (djghosh13/geneval). score: the reward-server's partial credit, the
    mean of its per-requirement terms (<= 1; see `geneval_check` for its range). strict_correct: the reward-server's
    stricter verdict (every count exact, every colour and relation right; exclude clauses ignored). reason: why
    `correct` is False, one clause per line ("all requirements met" when it is True).
    """
    correct: bool
    score: float
    strict_correct: bool
    reason: str


def validate_geneval_metadata(metadata, objects=GENEVAL_OBJECTS):
    """Check one GenEval metadata dict (a line of data/geneval/evaluation_metadata.jsonl); returns it unchanged.

    Expected: {"tag": one of GENEVAL_TAGS, "include": non-empty list of {"class": object name, "count": int >= 1,
    optional "color": one of GENEVAL_COLOURS, optional "position": [relation, i]} where relation is one of
    GENEVAL_RELATIONS and i indexes an EARLIER include clause (the target group), optional "exclude": list of
    {"class", "count"}}. Other top-level keys (e.g. "prompt") are ignored. Format of djghosh13/geneval
    prompts/evaluation_metadata.jsonl, as read by evaluation/evaluate_images.py. Class names must be in `objects`
    (GenEval's 80 COCO names; the shapes world passes SHAPES).

    Raises ValueError naming the fault: not a dict, unknown tag, missing or empty include, unknown class name,
    count not a positive int, unknown colour, unknown relation, bad target index, unknown keys in a clause.
    """
    if not isinstance(metadata, dict):
        raise ValueError(f"GenEval metadata must be a dict, got {type(metadata).__name__}")
    tag = metadata.get("tag")
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"unknown GenEval tag {tag!r}; known tags: {', '.join(GENEVAL_TAGS)}")
    include, exclude = metadata.get("include"), metadata.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise ValueError(f"GenEval metadata needs a non-empty 'include' list, got {include!r}")
    if not isinstance(exclude, list):
        raise ValueError(f"GenEval 'exclude' must be a list, got {exclude!r}")

    def check_clause(clause, where, allowed):
        if not isinstance(clause, dict):
            raise ValueError(f"GenEval {where} must be a dict, got {clause!r}")
        unknown = set(clause) - set(allowed)
        if unknown:
            raise ValueError(f"GenEval {where} has unknown keys {sorted(unknown)}; allowed: {', '.join(allowed)}")
        if clause.get("class") not in objects:
            raise ValueError(f"GenEval {where}: unknown class name {clause.get('class')!r}; known: "
                             f"{', '.join(objects) if len(objects) < 10 else 'data/geneval/object_names.txt'}")
        count = clause.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"GenEval {where}: 'count' must be an int >= 1, got {count!r}")

    for i, clause in enumerate(include):
        check_clause(clause, f"include[{i}]", ("class", "count", "color", "position"))
        if "color" in clause and clause["color"] not in GENEVAL_COLOURS:
            raise ValueError(f"GenEval include[{i}]: unknown colour {clause['color']!r}; "
                             f"known colours: {', '.join(GENEVAL_COLOURS)}")
        if "position" in clause:
            position = clause["position"]
            if not isinstance(position, (list, tuple)) or len(position) != 2:
                raise ValueError(f"GenEval include[{i}]: 'position' must be [relation, target index], "
                                 f"got {position!r}")
            relation, target = position
            if relation not in GENEVAL_RELATIONS:
                raise ValueError(f"GenEval include[{i}]: unknown relation {relation!r}; "
                                 f"known relations: {', '.join(GENEVAL_RELATIONS)}")
            if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < i:
                raise ValueError(f"GenEval include[{i}]: position target must index an earlier include clause "
                                 f"(0 <= index < {i}), got {target!r}")
    for i, clause in enumerate(exclude):
        check_clause(clause, f"exclude[{i}]", ("class", "count"))
    return metadata


def _box_iou(a, b):
    """Box IoU with the benchmark's inclusive-pixel convention (width = x1 - x0 + 1); 0 when the union is 0."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def geneval_filter(detections, tag, threshold=GENEVAL_THRESHOLD, counting_threshold=GENEVAL_COUNTING_THRESHOLD,
                   max_objects=GENEVAL_MAX_OBJECTS, max_overlap=GENEVAL_MAX_OVERLAP, objects=GENEVAL_OBJECTS):
    """Keep the detections the benchmark keeps, grouped by class: {label: [Detection, ...]}, best score first.

    Per class: keep score > threshold (> counting_threshold when tag == "counting"; strict inequality, compared in
    float32 as the detector's float32 scores are), sort by score descending (numpy argsort reversed, as the
    benchmark does, so exact ties keep its order), keep the first max_objects, then drop any box whose IoU (inclusive
    pixels) with an already kept box of the same class is >= max_overlap; max_overlap = 1.0, the benchmark's default,
    drops nothing (it does not suppress overlapping boxes or masks). Classes left empty are absent. Idempotent.
    Implements evaluate_image() of djghosh13/geneval evaluation/evaluate_images.py (same in yifan123/reward-server
    reward_server/gen_eval.py): thresholds 0.3 / 0.9, max_objects 16, max_overlap 1.0.

    detections: iterable of Detection (any classes, any order); objects: the known labels (GenEval's 80 COCO
    names, or the shapes world's SHAPES). Raises ValueError for an unknown tag or a detection whose label is not
    in `objects`.
    """
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"unknown GenEval tag {tag!r}; known tags: {', '.join(GENEVAL_TAGS)}")
    cutoff = np.float32(counting_threshold if tag == "counting" else threshold)
    by_class = {}
    for detection in detections:
        if detection.label not in objects:
            raise ValueError(f"detection label {detection.label!r} is not one of the object names "
                             f"({', '.join(objects) if len(objects) < 10 else 'GENEVAL_OBJECTS'})")
        by_class.setdefault(detection.label, []).append(detection)
    kept = {}
    for label, group in by_class.items():
        scores = np.array([d.score for d in group], dtype=np.float32)
        order = np.argsort(scores)[::-1]
        order = order[scores[order] > cutoff][:max_objects].tolist()
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(group[best])
            if max_overlap != 1:
                order = [i for i in order if _box_iou(group[best].box, group[i].box) < max_overlap]
        if chosen:
            kept[label] = chosen
    return kept


def geneval_relations(box_a, box_b, margin=GENEVAL_POSITION_MARGIN):
    """Where box A lies relative to box B: a subset of {"left of", "right of", "above", "below"} (may be empty).

    Boxes are (x0, y0, x1, y1) in pixels, y downwards (so "above" means a smaller y). With c = box centre and
    d = (|x1 - x0|, |y1 - y0|): offset = c_A - c_B; each axis of the offset is shrunk towards 0 by
    margin * (d_A + d_B) on that axis (clipped at 0, sign kept); if both shrunk components are below 1e-3 in size
    the answer is empty; else (dx, dy) = shrunk / |offset| (Euclidean norm of the UNshrunk offset) and
    dx < -0.5 -> "left of", dx > 0.5 -> "right of", dy < -0.5 -> "above", dy > 0.5 -> "below". So the margin is
    relative to the two boxes' sizes, not to the image, and a diagonal offset can give two relations or none.
    Implements relative_position() of djghosh13/geneval evaluation/evaluate_images.py (margin 0.1).
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)  # (box, corner, xy)
    centre_a, centre_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * (size_a + size_b), 0.0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def geneval_check(detections, metadata, colour_of, position_bug=False, clip_count_terms=False,
                  objects=GENEVAL_OBJECTS):
    """Score one image against its GenEval metadata: GenEvalResult(correct, score, strict_correct, reason).

    detections: the detector's Detection list for the image (all classes; filtered once here with
    `geneval_filter` and the metadata's tag, so already-filtered input gives the same answer). colour_of(detection)
    -> one of GENEVAL_COLOURS: the colour classifier (the benchmark's CLIP on `colour_crop`); called at most once
    per detection, and only for classes whose clause names a colour. correct and reason: `benchmark_verdict`;
    score and strict_correct: `partial_credit` (clip_count_terms, position_bug: see there). objects: the class
    names metadata and detections may use (GenEval's 80 COCO names; SHAPES for the shapes world): the rules are
    the same for every detector.

    Raises ValueError for malformed metadata (`validate_geneval_metadata`), an unknown detection label, or a
    colour_of result that is not in GENEVAL_COLOURS.
    """
    validate_geneval_metadata(metadata, objects)
    kept = geneval_filter(detections, metadata["tag"], objects=objects)
    colour = once_per_detection(colour_of)
    correct, reasons = benchmark_verdict(kept, metadata, colour)
    score, strict = partial_credit(kept, metadata, colour, position_bug, clip_count_terms)
    return GenEvalResult(correct=correct, score=score, strict_correct=strict,
                         reason="\n".join(reasons) if reasons else "all requirements met")


def once_per_detection(colour_of):
    """colour_of(detection), memoised per detection and checked to be one of GENEVAL_COLOURS (ValueError if not)."""
    colours = {}

    def colour(detection):
        if id(detection) not in colours:
            name = colour_of(detection)
            if name not in GENEVAL_COLOURS:
                raise ValueError(f"colour_of returned {name!r}, not one of {', '.join(GENEVAL_COLOURS)}")
            colours[id(detection)] = name
        return colours[id(detection)]
    return colour


def relation_failure(found, targets, relation):
    """The first (detection, its actual relations) of `found` not in `relation` to some box of `targets`, or None."""
    for obj in found:
        for target in targets:
            actual = geneval_relations(obj.box, target.box)
            if relation not in actual:
                return obj, actual
    return None


def benchmark_verdict(kept, metadata, colour):
    """The benchmark's binary verdict (djghosh13/geneval evaluation/evaluate_images.py, evaluate()): (correct,
    reasons, one line per failed clause). kept: `geneval_filter`'s output; colour(detection) -> colour name.

    Every include clause must hold and no exclude clause fire. An include clause takes the `count` best detections
    of its class and needs at least `count` of them; with "color", all those `count` must be classified that
    colour; with "position" [rel, i], every one of them must stand in relation rel (`geneval_relations`) to every
    object kept by include clause i, which must itself have held. An exclude clause {class, count} fires when count
    or more of its class remain (so counting's "exactly n" is include count n + exclude count n + 1).
    """
    correct, reasons, groups = True, [], []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = kept.get(name, [])[:count]
        holds = len(found) >= count
        if not holds:
            reasons.append(f"expected at least {count} {name}, found {len(found)}")
        else:
            if "color" in clause:
                seen = [colour(d) for d in found]
                if seen.count(clause["color"]) < count:
                    holds = False
                    tally = ", ".join(f"{seen.count(c)} {c}" for c in GENEVAL_COLOURS if c in seen)
                    reasons.append(f"expected {count} {clause['color']} {name}, colours found: {tally}")
            if "position" in clause and holds:
                relation, target = clause["position"]
                if groups[target] is None:
                    holds = False
                    reasons.append(f"{name} should be {relation} {metadata['include'][target]['class']}, "
                                   f"which failed its own check")
                else:
                    failure = relation_failure(found, groups[target], relation)
                    if failure is not None:
                        holds = False
                        actual = " and ".join(sorted(failure[1])) or "no clear relation"
                        reasons.append(f"expected {name} {relation} {metadata['include'][target]['class']}, "
                                       f"found {actual}")
        correct = correct and holds
        groups.append(found if holds else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        n = len(kept.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected fewer than {count} {name}, found {n}")
    return correct, reasons


def partial_credit(kept, metadata, colour, position_bug=False, clip_count_terms=False):
    """The reward-server's partial credit and strict verdict (yifan123/reward-server reward_server/gen_eval.py,
    evaluate_reward()): (score, strict_correct). kept, colour: as in `benchmark_verdict`.

    score = the mean of these terms, one group per include clause, with n = number of kept detections of the class
    (all of them, not just `count`):
      - count term 1 - |count - n| / count, always;
      - if n != count and the clause has a colour or a position: one term 0;
      - else, colour: (number of the n classified that colour) / count;
      - then, position (only if the colour, if any, was right): 0 if clause i did not hold exactly (same rules),
        else 1 if every pair stands in the relation, else 0.
    Exclude clauses do not enter the score. With position_bug=False (default, fixed) a failed relation adds the
    single term 0. position_bug=True reproduces the reward-server exactly: after a failed relation it appends 0
    AND then 1 (its `rewards.append(1.0)` runs after the loop whether or not a pair failed), so a failed relation
    counts as half right. Range: the count term goes below 0 when n > 2 * count (n <= 16, so score >= -14);
    clip_count_terms=True floors each count term at 0, making score lie in [0, 1] (not in the reward-server).
    strict_correct: every term above equal to 1 (exact counts), excludes ignored.
    """
    terms, strict, groups = [], True, []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = kept.get(name, [])
        count_term = 1.0 - abs(count - len(found)) / count
        terms.append(max(count_term, 0.0) if clip_count_terms else count_term)
        holds = len(found) == count
        if not holds:
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                right = [colour(d) for d in found].count(clause["color"])
                terms.append(1.0 - abs(count - right) / count)
                holds = right == count
            if "position" in clause and holds:
                relation, target = clause["position"]
                if groups[target] is None:
                    holds = False
                    terms.append(0.0)
                elif relation_failure(found, groups[target], relation) is None:
                    terms.append(1.0)
                else:
                    holds = False
                    terms.extend([0.0, 1.0] if position_bug else [0.0])
        strict = strict and holds
        groups.append(found if holds else None)
    return float(sum(terms) / len(terms) if terms else 0.0), strict


def colour_crop(image, detection, background=GENEVAL_CROP_BACKGROUND):
    """The colour classifier's input for one detection: an RGB PIL image of the object on flat grey, cropped.

    Pixels where detection.mask is True keep the image's colour, all others become `background` (#999 = (153,
    153, 153)); the result is cropped to detection.box with PIL's crop (corners rounded to whole pixels; parts
    of the box outside the image come out black), so its size is (round(x1) - round(x0), round(y1) - round(y0)).
    With mask None the whole image is kept inside the box. Implements ImageCrops of djghosh13/geneval
    evaluation/evaluate_images.py (defaults bgcolor "#999", crop "1"; also in yifan123/reward-server).

    image: PIL image of size (W, H) in any mode (converted to RGB). detection.mask: (H, W) bool array.
    Raises ValueError if the mask's shape is not (H, W).
    """
    from PIL import Image

    rgb = image.convert("RGB")
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != (rgb.height, rgb.width):
            raise ValueError(f"mask shape {mask.shape} does not match the image's (H, W) = "
                             f"{(rgb.height, rgb.width)}")
        pixels = np.where(mask[..., None], np.asarray(rgb), np.asarray(background, dtype=np.uint8))
        rgb = Image.fromarray(pixels.astype(np.uint8))  # (H, W, 3) uint8 -> RGB
    return rgb.crop(tuple(float(v) for v in detection.box[:4]))


# ---------------------------------------------------------------------------------------------------------------
# Model-backed GenEval (transformers): the Mask2Former detector and the CLIP colour classifier
#
# GenEval's detector is Mask2Former (Swin-S, COCO instance segmentation) and its colour classifier CLIP ViT-L/14,
# both through transformers here, so the reward runs where the rest of CRD runs; the benchmark itself uses mmdet's
# checkpoint and open_clip, so its numbers are close to, not equal to, these. The instance post-processing follows
# mmdet's MaskFormerFusionHead.instance_postprocess (the head GenEval's mmdet config uses).
# ---------------------------------------------------------------------------------------------------------------
# transformers' COCO-instance Mask2Former checkpoints name three classes as COCO does; GenEval renames them.
MASK2FORMER_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
MASK2FORMER_TOP_K = 100  # (query, class) pairs kept per image: mmdet's test_cfg max_per_image


def mask2former_labels(id2label):
    """GenEval object names of a Mask2Former checkpoint's classes: a tuple of 80 names, index = class index.

    id2label: the model config's {class index: name} (int or str keys). It must hold the 80 classes 0..79. Real
    names are mapped by name (lowercased, "_"/"-" read as spaces, COCO's "mouse" / "remote" / "keyboard" read as
    GenEval's "computer mouse" / "tv remote" / "computer keyboard"), so a checkpoint with another class order still
    maps right; transformers' placeholder names "LABEL_i" (a model built from a config, e.g. in tests) are taken to
    be in COCO's instance order, the order of GENEVAL_OBJECTS. Raises ValueError if there are not exactly 80 classes
    0..79 or a name is not a GenEval object.
    """
    names = {int(k): str(v) for k, v in dict(id2label).items()}
    if sorted(names) != list(range(len(GENEVAL_OBJECTS))):
        raise ValueError(f"the detector must have the {len(GENEVAL_OBJECTS)} COCO instance classes 0..79 "
                         f"(a COCO-instance Mask2Former), got {len(names)} classes")
    labels = []
    for index in range(len(GENEVAL_OBJECTS)):
        name = " ".join(names[index].lower().replace("_", " ").replace("-", " ").split())
        if name == f"label {index}":
            name = GENEVAL_OBJECTS[index]
        name = MASK2FORMER_ALIASES.get(name, name)
        if name not in GENEVAL_OBJECTS:
            raise ValueError(f"detector class {index} is {names[index]!r}, not a GenEval object name "
                             f"(see GENEVAL_OBJECTS)")
        labels.append(name)
    return tuple(labels)


def mask2former_instances(outputs, image_size, labels, top_k=MASK2FORMER_TOP_K, index=0):
    """Instance detections of one image from Mask2Former's outputs, as mmdet post-processes them.

    outputs: a `Mask2FormerForUniversalSegmentation` output (or anything with the same two fields):
    class_queries_logits (B, Q, C + 1), the last class being "no object", and masks_queries_logits (B, Q, h, w)
    at the network's mask resolution; `index` picks the image in the batch. image_size: the image's PIL size
    (W, H) in pixels; the masks are upsampled to it, so the network's input must be the whole image resized
    without padding. labels: class index -> GenEval name (a sequence or dict, e.g. `mask2former_labels(...)`).

    Steps (mmdet MaskFormerFusionHead.instance_postprocess, the detector head of GenEval's mmdet config):
    class probabilities = softmax over the C + 1 classes, "no object" then dropped; the top_k (query, class)
    pairs by probability over all Q x C pairs (all of them if top_k >= Q x C); the pair's query mask logits are
    upsampled bilinearly (align_corners=False) to (H, W) and thresholded at logit > 0; score = class probability
    x mean of sigmoid(mask logits) over the mask's pixels (0 for an empty mask); box = tight box of the mask,
    (x0, y0, x1, y1) = (first column, first row, last column + 1, last row + 1) in pixels, (0, 0, 0, 0) if empty.
    A query can appear under several classes. No threshold here: `geneval_filter` applies GenEval's.

    Returns a list of top_k Detection (mask: (H, W) bool numpy array), in descending class probability (not
    descending score). Raises ValueError if the two output tensors disagree on Q or top_k < 1.
    """
    import torch.nn.functional as F

    class_logits = outputs.class_queries_logits[index].detach().float()  # (Q, C + 1)
    mask_logits = outputs.masks_queries_logits[index].detach().float()   # (Q, h, w)
    if class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"class logits have {class_logits.shape[0]} queries, mask logits {mask_logits.shape[0]}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    width, height = image_size
    probs = class_logits.softmax(dim=-1)[:, :-1]  # (Q, C)
    n_classes = probs.shape[1]
    class_probs, flat = probs.flatten().topk(min(top_k, probs.numel()))  # sorted, descending
    queries, classes = flat // n_classes, flat % n_classes
    used, where = torch.unique(queries, return_inverse=True)  # upsample each chosen query once
    upsampled = F.interpolate(mask_logits[used][None], size=(height, width), mode="bilinear",
                              align_corners=False)[0]  # (U, H, W)
    binary = upsampled > 0
    area = binary.flatten(1).sum(dim=1)
    mask_scores = (upsampled.sigmoid() * binary).flatten(1).sum(dim=1) / area.clamp(min=1)  # (U,)
    columns, rows = binary.any(dim=1), binary.any(dim=2)  # (U, W), (U, H)
    first_col, first_row = columns.float().argmax(dim=1), rows.float().argmax(dim=1)
    end_col = width - columns.flip(dims=[1]).float().argmax(dim=1)
    end_row = height - rows.flip(dims=[1]).float().argmax(dim=1)
    boxes = torch.stack([first_col, first_row, end_col, end_row], dim=1).float() * (area > 0)[:, None]
    scores = class_probs * mask_scores[where]
    binary = binary.cpu().numpy()
    return [Detection(label=labels[int(c)], score=float(s), mask=binary[u], box=tuple(float(v) for v in boxes[u]))
            for c, s, u in zip(classes.tolist(), scores.tolist(), where.tolist())]


def _model_device_dtype(model):
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _embedding(output):
    """The projected embedding of CLIPModel.get_*_features: a Tensor in transformers 4, pooler_output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_image_embeddings(model, processor, images, device=None):
    """L2-normalised CLIP image embeddings (N, D), float32, of a list of PIL images (converted to RGB).

    Inputs go to `device` (the model must be there; None: the model's own device), in the model's dtype.
    """
    model_device, dtype = _model_device_dtype(model)
    device = model_device if device is None else device
    pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = _embedding(model.get_image_features(pixel_values=pixels.to(device=device, dtype=dtype)))
    return torch.nn.functional.normalize(features.float(), dim=-1)


def clip_text_embeddings(model, processor, texts, device=None):
    """L2-normalised CLIP text embeddings (N, D), float32, of a list of strings (padded, truncated to the
    tokenizer's model_max_length: 77 tokens for CLIP). `device` as in `clip_image_embeddings`."""
    device = _model_device_dtype(model)[0] if device is None else device
    tokens = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        features = _embedding(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                      attention_mask=tokens["attention_mask"].to(device)))
    return torch.nn.functional.normalize(features.float(), dim=-1)


def clip_colour_classifier(model, processor, device):
    """GenEval's zero-shot colour classifier around a CLIP model: returns `colour_of(image, detection) -> colour`.

    model: a transformers CLIPModel (on `device`; the benchmark's is CLIP ViT-L/14, openai weights); processor:
    its CLIPProcessor. For a detection, the classifier reads `colour_crop(image, detection)` (object on #999 grey,
    cropped to its box), embeds it, and returns the colour of GENEVAL_COLOURS whose text embedding has the largest
    dot product with it. A colour's text embedding, per object name (detection.label): the three
    GENEVAL_COLOUR_TEMPLATES filled with the colour and name, each embedded and L2-normalised, averaged, and
    re-normalised (clip_benchmark's zero_shot_classifier, as djghosh13/geneval builds it); cached per name.
    device: where the inputs go (the model must be there; None: the model's own device).
    `colour_of.colours(image, detections)` classifies several detections of one image in one batch.
    """
    cache = {}

    def text_embeddings(name):  # (colours, D)
        if name not in cache:
            texts = [template.format(colour=colour, object=name)
                     for colour in GENEVAL_COLOURS for template in GENEVAL_COLOUR_TEMPLATES]
            embedded = clip_text_embeddings(model, processor, texts, device)
            embedded = embedded.view(len(GENEVAL_COLOURS), len(GENEVAL_COLOUR_TEMPLATES), -1).mean(dim=1)
            cache[name] = torch.nn.functional.normalize(embedded, dim=-1)
        return cache[name]

    def colours(image, detections):
        if not detections:
            return []
        crops = clip_image_embeddings(model, processor, [colour_crop(image, d) for d in detections], device)
        names = [d.label for d in detections]
        picks = [int((crop @ text_embeddings(name).T).argmax()) for crop, name in zip(crops, names)]
        return [GENEVAL_COLOURS[i] for i in picks]

    def colour_of(image, detection):
        return colours(image, [detection])[0]

    colour_of.colours = colours
    return colour_of


def load_pretrained(loader, source, what):
    """`loader.from_pretrained(source)`, or a RuntimeError naming `source` and saying how to load it offline."""
    hint = ("Pass the path of a local folder holding it (written with save_pretrained) in place of the hub id, "
            "or, offline with the files already in the Hugging Face cache, set HF_HUB_OFFLINE=1.")
    if (os.path.isabs(source) or source.startswith((".", "~"))) and not os.path.isdir(os.path.expanduser(source)):
        raise RuntimeError(f"cannot load the {what} {source!r}: no such folder. {hint}")
    try:
        return loader.from_pretrained(os.path.expanduser(source))
    except Exception as error:  # hub, network and file errors alike: say which model and how to fix it
        raise RuntimeError(f"cannot load the {what} {source!r} with {loader.__name__}.from_pretrained "
                           f"({type(error).__name__}: {error}). {hint}") from error


def geneval_metadata(prompt, objects=GENEVAL_OBJECTS):
    """One GenEval prompt as its metadata dict: a dict is returned as is, a string is parsed as JSON (a line of
    data/geneval/evaluation_metadata.jsonl). Validated with `validate_geneval_metadata` (class names in `objects`).
    Raises ValueError for a string that is not JSON, or malformed metadata."""
    if isinstance(prompt, str):
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError as error:
            raise ValueError(f"a GenEval prompt must be its metadata (a dict or its JSON string), got {prompt!r}: "
                             f"{error}") from error
    return validate_geneval_metadata(prompt, objects)


def check_lengths(images, prompts):
    """ValueError unless there is one prompt per image."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")


def geneval_reward(device="cpu", detector="facebook/mask2former-swin-small-coco-instance",
                   clip="openai/clip-vit-large-patch14", position_bug=False):
    """Factory for the GenEval reward: Mask2Former detections + CLIP colours, scored by `geneval_check`.

    detector: hub id or local folder of a COCO-instance `Mask2FormerForUniversalSegmentation` with its image
    processor (AutoImageProcessor; its own resize settings, not mmdet's 1333x800 test resize); clip: the same for
    a `CLIPModel` + `CLIPProcessor` (the colour classifier, `clip_colour_classifier`). Both run on `device` in
    eval mode, without gradients. position_bug: see `geneval_check`.

    The returned fn takes N PIL images and N prompts, each a GenEval metadata dict ("prompt", "tag", "include",
    optional "exclude") or its JSON string, and returns (rewards, info): rewards float32 (N,) in [0, 1], the
    reward-server's partial credit with count terms floored at 0 (`geneval_check(..., clip_count_terms=True)`);
    info {"geneval/correct": float32 (N,), 1 where the benchmark counts the image correct, "geneval/strict": float32
    (N,), 1 where it is strictly correct} (per-image values: crd.py logs their mean and groups them by tag).
    Images of one size are detected in one batch (`mask2former_instances`, top 100 per image).

    Raises RuntimeError naming the model if one cannot be loaded (no network: pass a local folder or set
    HF_HUB_OFFLINE=1), ValueError if the detector's classes are not COCO's 80 (`mask2former_labels`); fn raises
    ValueError for malformed metadata or len(images) != len(prompts).
    """
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation

    detector_model = load_pretrained(Mask2FormerForUniversalSegmentation, detector, "GenEval detector")
    detector_model = detector_model.to(device).eval()
    detector_processor = load_pretrained(AutoImageProcessor, detector, "GenEval detector's image processor")
    clip_model = load_pretrained(CLIPModel, clip, "GenEval colour CLIP").to(device).eval()
    clip_processor = load_pretrained(CLIPProcessor, clip, "GenEval colour CLIP's processor")
    labels = mask2former_labels(detector_model.config.id2label)
    colour_of = clip_colour_classifier(clip_model, clip_processor, device)

    def detect(images):
        model_device, dtype = _model_device_dtype(detector_model)
        by_size, found = {}, [None] * len(images)
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for size, indices in by_size.items():  # one size per batch: no padding, masks map onto whole images
            inputs = detector_processor(images=[images[i].convert("RGB") for i in indices], return_tensors="pt")
            with torch.no_grad():
                outputs = detector_model(pixel_values=inputs["pixel_values"].to(device=model_device, dtype=dtype))
            for j, i in enumerate(indices):
                found[i] = mask2former_instances(outputs, size, labels, index=j)
        return found

    return geneval_scorer(detect, colour_of, GENEVAL_OBJECTS, position_bug)


def geneval_scorer(detect, colour_of, objects, position_bug=False):
    """The reward fn shared by every GenEval detector: the rules are `geneval_check`'s, only the detector differs.

    detect(images) -> one list of Detection per image; colour_of(image, detection) -> one of GENEVAL_COLOURS;
    objects: the class names prompts may use. Returns fn(images, prompts) -> (rewards float32 (N,) in [0, 1]: the
    reward-server's partial credit with count terms floored at 0, info {"geneval/correct", "geneval/strict":
    float32 (N,) of 0 / 1}); fn raises ValueError for malformed metadata or len(images) != len(prompts).
    """
    def fn(images, prompts):
        check_lengths(images, prompts)
        metadata = [geneval_metadata(p, objects) for p in prompts]
        results = [geneval_check(detections, meta, lambda d, image=image: colour_of(image, d),
                                 position_bug=position_bug, clip_count_terms=True, objects=objects)
                   for image, detections, meta in zip(images, detect(images), metadata)]
        rewards = torch.tensor([min(max(r.score, 0.0), 1.0) for r in results], dtype=torch.float32)
        return rewards, {"geneval/correct": torch.tensor([float(r.correct) for r in results]),
                         "geneval/strict": torch.tensor([float(r.strict_correct) for r in results])}

    return fn


# ---------------------------------------------------------------------------------------------------------------
# GenEval on a shapes world (the CPU task, assets/tiny-sd3-shapes): flat shapes in a few GenEval colours on white,
# drawn by tools/shapes_world.py. The detector is connected components + region properties (scikit-image) in
# place of Mask2Former, and the colour is the nearest palette colour in CIELAB in place of CLIP; the rules are
# `geneval_check`'s, unchanged.
# ---------------------------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_PALETTE = {"red": (220, 30, 30), "yellow": (235, 200, 20), "green": (30, 150, 50), "blue": (30, 70, 220),
                 "purple": (140, 50, 180), "black": (25, 25, 25)}  # sRGB of each colour the world draws
SHAPE_BACKGROUND = (255, 255, 255)
# Region features of each shape, drawn upright and filled at 12-20 px: extent = area / box area, solidity = area /
# convex-hull area, drop = (centroid row - box centre row) / box height (the triangle's apex is up). Means over the
# world's renders (tools/shapes_world.py; the test suite re-measures them); exact geometry would give circle
# (pi/4, 1, 0), triangle (1/2, 1, 1/6) and, for a plus sign with arms a third of its size, (5/9, 5/7, 0): pixel
# staircases and anti-aliased edges move them by up to 0.1.
SHAPE_FEATURES = {"circle": (0.816, 0.976, 0.0), "square": (1.0, 1.0, 0.0), "triangle": (0.533, 0.904, 0.156),
                  "cross": (0.584, 0.778, 0.0)}
SHAPE_FEATURE_SCALE = (0.15, 0.15, 0.05)  # a feature off by this much costs one unit of distance
SHAPE_FOREGROUND_DELTA = 30.0  # CIE76 colour distance from the background above which a pixel is foreground
SHAPE_MIN_AREA = 12            # pixels; smaller regions are specks, not objects


def shape_features(mask):
    """(extent, solidity, drop) of one region, as in SHAPE_FEATURES; mask (H, W) bool with one connected region."""
    from skimage.measure import regionprops

    region = regionprops(mask.astype(np.uint8))[0]
    top, _, bottom, _ = region.bbox
    return region.extent, region.solidity, (region.centroid[0] - (top + bottom - 1) / 2) / (bottom - top)


def shape_detections(image, min_area=SHAPE_MIN_AREA, foreground_delta=SHAPE_FOREGROUND_DELTA):
    """Detect the shapes world's objects in one image: a list of Detection (label in SHAPES), any order.

    image: PIL image (any size) of flat shapes on SHAPE_BACKGROUND. Foreground = pixels farther than
    `foreground_delta` (CIE76, CIELAB) from the background; objects = its 4-connected components of at least
    `min_area` pixels (skimage.measure.label / regionprops). Each is labelled with the nearest shape in
    SHAPE_FEATURES (distance d in units of SHAPE_FEATURE_SCALE) and scored exp(-d^2 / 2) in (0, 1], so a clean
    render scores ~1 and a blob that is no clear shape scores low (the counting rule keeps only scores > 0.9);
    mask = the component, box = (x0, y0, x1, y1) of its pixels (inclusive), as Mask2Former's are used.
    Touching shapes form one component: one object, as a detector would see them.
    """
    from skimage.color import deltaE_cie76, rgb2lab
    from skimage.measure import label

    lab = rgb2lab(np.asarray(image.convert("RGB")))
    background = rgb2lab(np.array([[SHAPE_BACKGROUND]], dtype=np.uint8))[0, 0]
    components = label(deltaE_cie76(lab, background) > foreground_delta, connectivity=1)
    found = []
    for index in range(1, components.max() + 1):
        mask = components == index
        if mask.sum() < min_area:
            continue
        features = np.array(shape_features(mask))
        distances = {name: float(np.linalg.norm((features - np.array(proto)) / SHAPE_FEATURE_SCALE))
                     for name, proto in SHAPE_FEATURES.items()}
        name = min(distances, key=distances.get)
        rows, cols = np.nonzero(mask)
        found.append(Detection(label=name, score=math.exp(-distances[name] ** 2 / 2), mask=mask,
                               box=(float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))))
    return found


def shape_colour(image, detection):
    """The palette colour (a key of SHAPE_PALETTE, all GenEval colour names) nearest in CIELAB (CIE76) to the
    median colour of the detection's mask, eroded by one pixel when that leaves any (edges are blended with the
    background). image: PIL image; detection: a Detection with a mask of the image's size."""
    from scipy.ndimage import binary_erosion
    from skimage.color import deltaE_cie76, rgb2lab

    mask = detection.mask
    inner = binary_erosion(mask)
    lab = rgb2lab(np.asarray(image.convert("RGB")))[inner if inner.any() else mask]
    median = np.median(lab, axis=0)
    palette = rgb2lab(np.array([list(SHAPE_PALETTE.values())], dtype=np.uint8))[0]
    return list(SHAPE_PALETTE)[int(np.argmin(deltaE_cie76(palette, median[None])))]


def geneval_shapes_reward(device="cpu", position_bug=False):
    """Factory for GenEval on the shapes world: `shape_detections` + `shape_colour`, scored by `geneval_check`.

    Prompts: GenEval metadata whose classes are SHAPES (data/tiny_geneval/*.jsonl). Returns the fn of
    `geneval_scorer` (rewards in [0, 1], info geneval/correct and geneval/strict). device: ignored
    (no model). position_bug: see `geneval_check`.
    """
    return geneval_scorer(lambda images: [shape_detections(image) for image in images], shape_colour, SHAPES,
                          position_bug)


# A second, independently built detector for the shapes world, used only as an unseen metric (never trained on),
# as PP-OCR is for the OCR task: a different foreground rule (Otsu's threshold on darkness), 8-connected regions
# (scipy.ndimage), shape from the vertex count of the outline's polygon and its circularity (scikit-image), colour
# from the hue and value of the region's mean colour (colorsys). Only the GenEval rules are shared.
POLYGON_PROTOTYPES = {"triangle": (3, 0.66), "square": (4, 0.89), "circle": (8, 1.0), "cross": (12, 0.56)}
POLYGON_TOLERANCE = 0.08   # polygon simplification tolerance, as a fraction of the region's larger box side
POLYGON_VERTEX_SCALE = 0.5    # log2 vertex count off by this much costs one unit of distance
POLYGON_CIRCULARITY_SLACK, POLYGON_CIRCULARITY_SCALE = 0.12, 0.05  # free band, then cost per unit off
POLYGON_MIN_DARKNESS = 0.25   # foreground threshold floor (1 - min(R, G, B) / 255): a blank image has no objects
POLYGON_MIN_AREA = 16         # pixels
POLYGON_BLACK_VALUE = 0.35    # a region whose mean colour has HSV value below this is black
POLYGON_HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0] for name, rgb in SHAPE_PALETTE.items()
                if name != "black"}  # hue in [0, 1) of each coloured palette entry


def polygon_features(mask):
    """(vertices, circularity) of one region: the vertex count of its outer outline simplified by Douglas-Peucker
    (skimage.measure.approximate_polygon, tolerance POLYGON_TOLERANCE x the larger box side) and 4 pi area /
    perimeter^2. mask: (H, W) bool, one connected region. Renders give 3 / 4 / 8 / 12 vertices for triangle /
    square / circle / cross."""
    from skimage.measure import approximate_polygon, find_contours, regionprops

    region = regionprops(mask.astype(np.uint8))[0]
    outline = max(find_contours(np.pad(mask, 1).astype(float), 0.5), key=len)
    side = max(region.bbox[2] - region.bbox[0], region.bbox[3] - region.bbox[1])
    vertices = max(len(approximate_polygon(outline, tolerance=POLYGON_TOLERANCE * side)) - 1, 1)
    return vertices, 4 * math.pi * region.area / max(region.perimeter, 1e-6) ** 2


def polygon_detections(image):
    """The second shapes detector: a list of Detection (label in SHAPES), any order, as `shape_detections` returns.

    image: PIL image of flat shapes on white. Foreground = darkness 1 - min(R, G, B) / 255 above Otsu's threshold
    (skimage.filters.threshold_otsu, floored at POLYGON_MIN_DARKNESS); objects = 8-connected regions of at least
    POLYGON_MIN_AREA pixels (scipy.ndimage.label). Label = nearest entry of POLYGON_PROTOTYPES by
    d^2 = (log2 vertices off / POLYGON_VERTEX_SCALE)^2 + (circularity off beyond the slack / its scale)^2, score
    exp(-d^2 / 2) in (0, 1] (a clean render scores 1).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    darkness = 1 - np.asarray(image.convert("RGB"), dtype=np.float32).min(axis=2) / 255
    threshold = max(threshold_otsu(darkness) if darkness.max() > darkness.min() else 1.0, POLYGON_MIN_DARKNESS)
    regions, _ = ndimage.label(darkness > threshold, structure=np.ones((3, 3)))
    found = []
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        mask = regions == index
        if mask.sum() < POLYGON_MIN_AREA:
            continue
        vertices, circularity = polygon_features(mask)
        distances = {name: math.hypot(math.log2(vertices / v) / POLYGON_VERTEX_SCALE,
                                      max(abs(circularity - c) - POLYGON_CIRCULARITY_SLACK, 0)
                                      / POLYGON_CIRCULARITY_SCALE)
                     for name, (v, c) in POLYGON_PROTOTYPES.items()}
        name = min(distances, key=distances.get)
        rows, cols = box
        found.append(Detection(label=name, score=math.exp(-distances[name] ** 2 / 2), mask=mask,
                               box=(float(cols.start), float(rows.start), float(cols.stop - 1), float(rows.stop - 1))))
    return found


def polygon_colour(image, detection):
    """The palette colour of a detection by hue: black if the HSV value of the mean colour of its mask (eroded by one
    pixel when that leaves any) is below POLYGON_BLACK_VALUE, else the non-black palette colour of nearest hue
    (on the hue circle). image: PIL image; detection: a Detection with a mask of the image's size."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(detection.mask)
    mean = np.asarray(image.convert("RGB"), dtype=np.float32)[inner if inner.any() else detection.mask].mean(axis=0)
    hue, _, value = colorsys.rgb_to_hsv(*(mean / 255))
    if value < POLYGON_BLACK_VALUE:
        return "black"
    return min(POLYGON_HUES, key=lambda name: min(abs(hue - POLYGON_HUES[name]), 1 - abs(hue - POLYGON_HUES[name])))


def geneval_shapes_polygon_reward(device="cpu", position_bug=False):
    """Factory for the unseen GenEval metric of the shapes world: `polygon_detections` + `polygon_colour`, scored by
    the same `geneval_check` rules as `geneval_shapes_reward` (rewards in [0, 1], info geneval/correct and
    geneval/strict). device: ignored (no model)."""
    return geneval_scorer(lambda images: [polygon_detections(image) for image in images], polygon_colour, SHAPES,
                          position_bug)
