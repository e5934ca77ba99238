"""Tests of geneval.py: GenEval's rules on hand-built detections with known answers (no models), the shapes
world's two detectors on rendered scenes, the Mask2Former post-processing and the CLIP colour classifier on tiny
random models, the GenEval reward end to end, the training-prompt generator, and the GenEval presets."""
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import crd
import geneval
import plumbing
import reward
from conftest import ROOT, image, sd35m_layout_pipeline
from geneval import (GENEVAL_COLOURS, GENEVAL_CROP_BACKGROUND, GENEVAL_OBJECTS, Detection, clip_colour_classifier,
                     geneval_check, geneval_filter, geneval_relations, geneval_reward, mask2former_instances,
                     mask2former_labels, validate_geneval_metadata)
from reward import clipscore_reward, pickscore_reward


# ---------------------------------------------------------------------------------------------------------------
# GenEval rules (geneval.py): hand-built detections with known answers, no models. The benchmark's binary verdict
# (djghosh13/geneval evaluation/evaluate_images.py), the reward-server's partial score (yifan123/reward-server
# reward_server/gen_eval.py) with and without its position bug, the detection filter, the relation geometry, the
# colour classifier's input crop, and metadata validation (all 553 shipped lines).
# ---------------------------------------------------------------------------------------------------------------

GENEVAL_DIR = os.path.join(ROOT, "data", "geneval")
SIZE = 64  # images are SIZE x SIZE pixels


def det(label, box, score=0.95, colour=None):
    """A detection whose mask is its box; `colour` is what the fake colour classifier will say."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    x0, y0, x1, y1 = (min(max(int(round(v)), 0), SIZE) for v in box)  # the part of the box inside the image
    mask[y0:y1, x0:x1] = True
    detection = Detection(label=label, score=score, mask=mask, box=tuple(float(v) for v in box))
    detection.colour = colour  # read by colour_of below; not a field of Detection
    return detection


def colour_of(detection):
    return detection.colour


def no_colour(detection):
    raise AssertionError("colour_of must not be called when no clause names a colour")


# ---------------------------------------------------------------------------------------------------------------
# The six tags
# ---------------------------------------------------------------------------------------------------------------
def test_single_object_pass_and_fail():
    meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    ok = geneval_check([det("bench", (5, 5, 30, 30))], meta, no_colour)
    assert (ok.correct, ok.score, ok.strict_correct) == (True, 1.0, True)
    assert ok.reason == "all requirements met"
    missing = geneval_check([det("dog", (5, 5, 30, 30))], meta, no_colour)
    assert (missing.correct, missing.score, missing.strict_correct) == (False, 0.0, False)
    assert "bench" in missing.reason


def test_single_object_extra_copies_pass_benchmark_but_cost_partial_score():
    meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    two = geneval_check([det("bench", (0, 0, 10, 10)), det("bench", (30, 30, 40, 40), 0.8)], meta, no_colour)
    assert two.correct and not two.strict_correct
    assert two.score == pytest.approx(0.0)  # 1 - |1 - 2| / 1
    three = [det("bench", (0, 0, 10, 10)), det("bench", (20, 20, 30, 30)), det("bench", (40, 40, 50, 50))]
    assert geneval_check(three, meta, no_colour).score == pytest.approx(-1.0)  # 1 - |1 - 3| / 1: not floored
    assert geneval_check(three, meta, no_colour, clip_count_terms=True).score == 0.0


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}]}
    both = geneval_check([det("bench", (0, 0, 20, 20)), det("sports ball", (30, 30, 40, 40))], meta, no_colour)
    assert (both.correct, both.score, both.strict_correct) == (True, 1.0, True)
    one = geneval_check([det("bench", (0, 0, 20, 20))], meta, no_colour)
    assert not one.correct and one.score == pytest.approx(0.5)  # terms (1, 0)
    assert "sports ball" in one.reason


def test_counting_needs_exact_count_via_exclude():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    clocks = [det("clock", (i * 15, 0, i * 15 + 10, 10)) for i in range(4)]
    two = geneval_check(clocks[:2], meta, no_colour)
    assert (two.correct, two.score, two.strict_correct) == (True, 1.0, True)
    three = geneval_check(clocks[:3], meta, no_colour)  # include holds, the exclude clause fires
    assert not three.correct and "fewer than 3 clock" in three.reason
    assert three.score == pytest.approx(0.5) and not three.strict_correct  # 1 - |2 - 3| / 2
    one = geneval_check(clocks[:1], meta, no_colour)
    assert not one.correct and one.score == pytest.approx(0.5)
    four = geneval_check(clocks, meta, no_colour)
    assert not four.correct and four.score == pytest.approx(0.0)  # 1 - |2 - 4| / 2


def test_counting_uses_the_090_threshold():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    confident = det("clock", (0, 0, 10, 10), 0.95)
    unsure = det("clock", (20, 0, 30, 10), 0.85)
    result = geneval_check([confident, unsure], meta, no_colour)
    assert not result.correct and result.score == pytest.approx(0.5)  # only one clock survives 0.9
    # the same detections under a non-counting tag: 0.85 > 0.3, so two clocks
    two_meta = {"tag": "two_object", "include": [{"class": "clock", "count": 2}]}
    assert geneval_check([confident, unsure], two_meta, no_colour).correct


def test_colors_match_and_mismatch():
    meta = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}]}
    blue = geneval_check([det("fire hydrant", (0, 0, 20, 40), colour="blue")], meta, colour_of)
    assert (blue.correct, blue.score, blue.strict_correct) == (True, 1.0, True)
    red = geneval_check([det("fire hydrant", (0, 0, 20, 40), colour="red")], meta, colour_of)
    assert not red.correct and not red.strict_correct
    assert red.score == pytest.approx(0.5)  # terms (count 1, colour 0)
    assert "blue" in red.reason and "1 red" in red.reason


def test_colors_benchmark_judges_only_the_best_detections():
    meta = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}]}
    best = det("fire hydrant", (0, 0, 20, 40), 0.9, colour="blue")
    worse = det("fire hydrant", (30, 0, 50, 40), 0.5, colour="red")
    result = geneval_check([worse, best], meta, colour_of)
    assert result.correct  # the top-1 hydrant is blue; the red one is not looked at
    assert result.score == pytest.approx(0.0)  # terms (1 - |1 - 2| / 1 = 0, a wrong count adds 0)
    flipped = geneval_check([det("fire hydrant", (0, 0, 20, 40), 0.9, colour="red"),
                             det("fire hydrant", (30, 0, 50, 40), 0.5, colour="blue")], meta, colour_of)
    assert not flipped.correct


def test_color_attr():
    meta = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                             {"class": "apple", "count": 1, "color": "black"}]}
    glass = det("wine glass", (0, 0, 20, 40), colour="purple")
    good = geneval_check([glass, det("apple", (30, 30, 50, 50), colour="black")], meta, colour_of)
    assert (good.correct, good.score, good.strict_correct) == (True, 1.0, True)
    bad = geneval_check([glass, det("apple", (30, 30, 50, 50), colour="red")], meta, colour_of)
    assert not bad.correct and bad.score == pytest.approx(0.75)  # terms (1, 1, 1, 0)


def test_colour_of_must_return_a_known_colour():
    meta = {"tag": "colors", "include": [{"class": "apple", "count": 1, "color": "red"}]}
    with pytest.raises(ValueError, match="colour_of returned 'crimson'"):
        geneval_check([det("apple", (0, 0, 10, 10), colour="crimson")], meta, colour_of)


POSITION_META = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                                {"class": "dog", "count": 1, "position": ["right of", 0]}]}


def test_position_tag_pass_fail_and_bug_switch():
    bear = det("teddy bear", (0, 20, 20, 40))
    right = geneval_check([bear, det("dog", (40, 20, 60, 40))], POSITION_META, no_colour)
    assert (right.correct, right.score, right.strict_correct) == (True, 1.0, True)
    left = [bear, det("dog", (-40, 20, -20, 40))]  # dog left of the bear
    fixed = geneval_check(left, POSITION_META, no_colour)
    assert not fixed.correct and "found left of" in fixed.reason
    assert fixed.score == pytest.approx(2 / 3)  # terms (1, 1, 0)
    buggy = geneval_check(left, POSITION_META, no_colour, position_bug=True)
    assert buggy.score == pytest.approx(0.75)  # terms (1, 1, 0, 1): the reward-server appends 1 after the 0
    assert not buggy.correct and not buggy.strict_correct


def test_position_bug_switch_changes_nothing_when_the_relation_holds_or_is_not_checked():
    bear = det("teddy bear", (0, 20, 20, 40))
    dog = det("dog", (40, 20, 60, 40))
    for bug in (False, True):
        assert geneval_check([bear, dog], POSITION_META, no_colour, position_bug=bug).score == 1.0
        # no dog: terms (1, 0 count, 0 for the unchecked relation)
        assert geneval_check([bear], POSITION_META, no_colour, position_bug=bug).score == pytest.approx(1 / 3)
        # no bear: terms (0, 1, 0 because the target clause failed)
        no_target = geneval_check([dog], POSITION_META, no_colour, position_bug=bug)
        assert no_target.score == pytest.approx(1 / 3)
        assert not no_target.correct and "failed its own check" in no_target.reason


def test_position_checks_every_pair_against_the_target_group():
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 2},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    bears_left = [det("teddy bear", (0, 0, 10, 10)), det("teddy bear", (0, 40, 10, 50))]
    between = [det("teddy bear", (0, 0, 10, 10)), det("teddy bear", (50, 40, 60, 50))]
    dog = det("dog", (30, 20, 40, 30))
    assert geneval_check(bears_left + [dog], meta, no_colour).correct
    assert not geneval_check(between + [dog], meta, no_colour).correct  # right of one bear, left of the other


@pytest.mark.parametrize("dog_box, relation", [
    ((40, 20, 60, 40), "right of"), ((-40, 20, -20, 40), "left of"),
    ((0, -20, 20, 0), "above"), ((0, 60, 20, 80), "below")])
def test_each_relation(dog_box, relation):
    bear = det("teddy bear", (0, 20, 20, 40))
    assert geneval_relations(dog_box, bear.box) == {relation}
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": [relation, 0]}]}
    dog = det("dog", dog_box)
    assert geneval_check([bear, dog], meta, no_colour).correct
    others = [r for r in geneval.GENEVAL_RELATIONS if r != relation]
    for other in others:
        meta["include"][1]["position"] = [other, 0]
        assert not geneval_check([bear, dog], meta, no_colour).correct


def test_relation_margin_is_a_tenth_of_the_summed_box_sizes():
    # centres 1.5 px apart horizontally; margin 0.1 * (10 + 10) = 2 px swallows it: no relation, so "left of" fails
    assert geneval_relations((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    bear, dog = det("teddy bear", (1.5, 0, 11.5, 10)), det("dog", (0, 0, 10, 10))
    assert not geneval_check([bear, dog], meta, no_colour).correct
    # same centres, thinner boxes (widths 2): margin 0.4 px < 1.5 px, so A is left of B
    assert geneval_relations((4, 0, 6, 10), (5.5, 0, 7.5, 10)) == {"left of"}
    # 11 px apart, widths 10: shrunk offset 9 / 11 = 0.82 > 0.5
    assert geneval_relations((0, 0, 10, 10), (11, 0, 21, 10)) == {"left of"}
    # shrunk / |offset| <= 0.5: offset 3, margin 2, 1 / 3 < 0.5 -> nothing
    assert geneval_relations((0, 0, 10, 10), (3, 0, 13, 10)) == set()
    assert geneval_relations((0, 0, 10, 10), (3, 0, 13, 10), margin=0.0) == {"left of"}


def test_diagonal_offset_gives_two_relations():
    # offset (-10, -10), sizes 2: shrunk (-9.6, -9.6) / 14.14 = -0.68 on both axes
    assert geneval_relations((0, 0, 2, 2), (10, 10, 12, 12)) == {"left of", "above"}


# ---------------------------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------------------------
def test_filter_threshold_is_strictly_above_030():
    at = det("cat", (0, 0, 10, 10), float(np.float32(0.3)))  # a float32 detector score of exactly 0.3
    above = det("cat", (20, 0, 30, 10), 0.31)
    below = det("dog", (0, 20, 10, 30), 0.29)
    kept = geneval_filter([at, above, below], "single_object")
    assert kept == {"cat": [above]}


def test_filter_counting_threshold_is_090():
    scores = [0.95, 0.91, float(np.float32(0.9)), 0.89, 0.5]
    dets = [det("cup", (i * 10, 0, i * 10 + 5, 5), s) for i, s in enumerate(scores)]
    assert [d.score for d in geneval_filter(dets, "counting")["cup"]] == [0.95, 0.91]
    assert len(geneval_filter(dets, "two_object")["cup"]) == 5


def test_filter_caps_16_per_class_best_first_and_keeps_overlaps():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.4, 1.0, size=20).tolist()
    cups = [det("cup", (0, 0, 10, 10), s) for s in scores]  # all the same box: the benchmark keeps overlaps
    books = [det("book", (0, 0, 10, 10), 0.5)]
    kept = geneval_filter(cups + books, "colors")
    assert [d.score for d in kept["cup"]] == sorted(scores, reverse=True)[:16]
    assert kept["book"] == books
    # the optional box suppression (off by default) drops same-class boxes with IoU >= max_overlap
    assert len(geneval_filter(cups, "colors", max_overlap=0.5)["cup"]) == 1


def test_filter_is_idempotent_and_check_agrees_on_filtered_input():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    dets = [det("clock", (i * 3, 0, i * 3 + 10, 10), 0.8 + 0.01 * i) for i in range(20)]
    once = geneval_filter(dets, "counting")
    flat = [d for group in once.values() for d in group]
    assert geneval_filter(flat, "counting") == once
    assert geneval_check(dets, meta, no_colour) == geneval_check(flat, meta, no_colour)


def test_filter_rejects_unknown_label_and_tag():
    with pytest.raises(ValueError, match="is not one of the object names"):
        geneval_filter([det("mouse", (0, 0, 5, 5))], "single_object")
    with pytest.raises(ValueError, match="unknown GenEval tag"):
        geneval_filter([], "spatial")


# ---------------------------------------------------------------------------------------------------------------
# Colour classifier input
# ---------------------------------------------------------------------------------------------------------------
def test_colour_crop_size_and_grey_background():
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    mask = np.zeros((30, 40), dtype=bool)
    mask[10:20, 5:15] = True
    detection = Detection("apple", 0.9, mask, (2.0, 8.0, 20.0, 24.0))
    crop = geneval.colour_crop(image, detection)
    assert crop.mode == "RGB" and crop.size == (18, 16)
    pixels = np.asarray(crop)
    inside = pixels[2:12, 3:13]  # mask rows 10..19, cols 5..14 shifted by the box corner (2, 8)
    assert (inside == (200, 10, 10)).all()
    outside = np.ones(pixels.shape[:2], dtype=bool)
    outside[2:12, 3:13] = False
    assert (pixels[outside] == (153, 153, 153)).all()
    # fractional corners round as PIL's crop does; no mask keeps the image
    assert geneval.colour_crop(image, Detection("apple", 0.9, None, (0.4, 0.6, 10.2, 9.7))).size == (10, 9)
    assert (np.asarray(geneval.colour_crop(image, Detection("apple", 0.9, None, (0, 0, 5, 5)))) == (200, 10, 10)).all()


def test_colour_crop_rejects_a_mask_of_the_wrong_shape():
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match="mask shape"):
        geneval.colour_crop(image, Detection("apple", 0.9, np.ones((40, 30), dtype=bool), (0, 0, 5, 5)))


def test_colour_constants():
    assert geneval.GENEVAL_COLOURS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                                      "black", "white")
    prompts = [t.format(colour="blue", object="fire hydrant") for t in geneval.GENEVAL_COLOUR_TEMPLATES]
    assert prompts == ["a photo of a blue fire hydrant", "a photo of a blue-colored fire hydrant",
                       "a photo of a blue object"]


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, message", [
    ({"tag": "spatial", "include": [{"class": "dog", "count": 1}]}, "unknown GenEval tag"),
    ({"tag": "single_object", "include": [{"class": "puppy", "count": 1}]}, "unknown class name 'puppy'"),
    ({"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "crimson"}]}, "unknown colour 'crimson'"),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 0}]}, "'count' must be an int >= 1"),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1.0}]}, "'count' must be an int >= 1"),
    ({"tag": "single_object", "include": []}, "non-empty 'include'"),
    ({"tag": "single_object"}, "non-empty 'include'"),
    ({"tag": "colors", "include": [{"class": "dog", "count": 1, "colour": "red"}]}, "unknown keys"),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                     "position": ["next to", 0]}]},
     "unknown relation"),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                     "position": ["above", 1]}]},
     "earlier include clause"),
    ({"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dogs", "count": 3}]},
     "exclude\\[0\\]: unknown class name"),
    ("not a dict", "must be a dict"),
])
def test_malformed_metadata_raises(meta, message):
    with pytest.raises(ValueError, match=message):
        geneval.validate_geneval_metadata(meta)
    with pytest.raises(ValueError, match=message):
        geneval_check([], meta, no_colour)


def test_every_shipped_metadata_line_validates():
    with open(os.path.join(GENEVAL_DIR, "evaluation_metadata.jsonl")) as file:
        lines = file.read().splitlines()
    assert len(lines) == 553
    tags = []
    for line in lines:
        meta = json.loads(line)
        assert geneval.validate_geneval_metadata(meta) is meta
        tags.append(meta["tag"])
    assert {tag: tags.count(tag) for tag in set(tags)} == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def test_object_names_match_the_shipped_list():
    with open(os.path.join(GENEVAL_DIR, "object_names.txt")) as file:
        assert tuple(file.read().splitlines()) == geneval.GENEVAL_OBJECTS


# ---------------------------------------------------------------------------------------------------------------
# The shapes world (tools/shapes_world.py) and its detector (geneval.shape_detections): rendered scenes of known
# content must be found, and fed to the same GenEval rules, to the expected verdicts
# ---------------------------------------------------------------------------------------------------------------
def shapes_scene(*objects):
    """A scene from (shape, colour, x0, y0, side) tuples, in tools.shapes_world's format."""
    return [(shape, colour, (x0, y0, x0 + side - 1, y0 + side - 1)) for shape, colour, x0, y0, side in objects]


# the trained reward's detector and the unseen metric's, built independently: both must pass every test below
DETECTORS = {"regions": (geneval.shape_detections, geneval.shape_colour),
             "polygons": (geneval.polygon_detections, geneval.polygon_colour)}


def shapes_geneval(scene, metadata, detector="regions"):
    from tools.shapes_world import render

    detect, colour_of = DETECTORS[detector]
    image = render(scene)
    return geneval.geneval_check(detect(image), metadata, lambda d: colour_of(image, d), objects=geneval.SHAPES)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("shape", geneval.SHAPES)
@pytest.mark.parametrize("side", [12, 16, 20, 26])
def test_shape_detector_names_every_shape_and_colour(shape, side, detector):
    from tools.shapes_world import render

    detect, colour_of = DETECTORS[detector]
    for colour in geneval.SHAPE_PALETTE:
        image = render(shapes_scene((shape, colour, 20, 10, side)))
        (found,) = detect(image)
        assert (found.label, colour_of(image, found)) == (shape, colour)
        assert found.score > geneval.GENEVAL_COUNTING_THRESHOLD  # clean renders pass even the counting threshold
        assert found.box == (20.0, 10.0, 20.0 + side - 1, 10.0 + side - 1)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shape_detector_counts_separate_shapes_and_merges_touching_ones(count, detector):
    corners = [(2, 2), (40, 2), (2, 40), (40, 40)]
    scene = shapes_scene(*[("circle", "blue", x, y, 18) for x, y in corners[:count]])
    metadata = {"tag": "counting", "include": [{"class": "circle", "count": count}],
                "exclude": [{"class": "circle", "count": count + 1}]}
    assert shapes_geneval(scene, metadata, detector).correct
    if count > 1:  # one circle fewer asked for: the exclude clause fires
        fewer = {"tag": "counting", "include": [{"class": "circle", "count": count - 1}],
                 "exclude": [{"class": "circle", "count": count}]}
        assert not shapes_geneval(scene, fewer, detector).correct
    from tools.shapes_world import render

    touching = render(shapes_scene(("square", "red", 10, 10, 16), ("square", "red", 26, 10, 16)))
    assert len(DETECTORS[detector][0](touching)) == 1  # one region, as any detector would see it
    assert DETECTORS[detector][0](render([])) == []  # a blank image holds no object


@pytest.mark.parametrize("detector", DETECTORS)
def test_shape_detector_positions_follow_the_geneval_relations(detector):
    left_of = {"tag": "position", "include": [{"class": "square", "count": 1},
                                              {"class": "triangle", "count": 1, "position": ["left of", 0]}]}
    assert shapes_geneval(shapes_scene(("triangle", "green", 4, 24, 16), ("square", "red", 40, 24, 16)),
                          left_of, detector).correct
    swapped = shapes_geneval(shapes_scene(("triangle", "green", 40, 24, 16), ("square", "red", 4, 24, 16)), left_of,
                             detector)
    assert not swapped.correct and "found right of" in swapped.reason
    above = dict(left_of, include=[left_of["include"][0], {"class": "triangle", "count": 1,
                                                           "position": ["above", 0]}])
    assert shapes_geneval(shapes_scene(("triangle", "green", 24, 2, 16), ("square", "red", 24, 40, 16)),
                          above, detector).correct


@pytest.mark.parametrize("detector", DETECTORS)
def test_shape_detector_colour_binding_and_partial_credit(detector):
    metadata = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                                 {"class": "cross", "count": 1, "color": "blue"}]}
    right = shapes_geneval(shapes_scene(("circle", "red", 4, 4, 18), ("cross", "blue", 36, 36, 18)), metadata,
                           detector)
    assert right.correct and right.score == 1.0
    swapped = shapes_geneval(shapes_scene(("circle", "blue", 4, 4, 18), ("cross", "red", 36, 36, 18)), metadata,
                             detector)
    assert not swapped.correct and swapped.score == 0.5  # both counts right (1, 1), both colours wrong (0, 0)
    blank = shapes_geneval([], metadata, detector)
    assert not blank.correct and blank.score == 0.0


def test_shape_features_are_the_means_of_the_worlds_renders():
    import random

    from tools.shapes_world import render

    rng, measured = random.Random(0), {name: [] for name in geneval.SHAPES}
    for shape in geneval.SHAPES:
        for _ in range(30):
            side = rng.randint(12, 20)
            image = render(shapes_scene((shape, rng.choice(list(geneval.SHAPE_PALETTE)), 10, 10, side)))
            measured[shape].append(geneval.shape_features(geneval.shape_detections(image)[0].mask))
    for shape, values in measured.items():
        np.testing.assert_allclose(np.mean(values, axis=0), geneval.SHAPE_FEATURES[shape], atol=0.02)


def test_shapes_world_scenes_satisfy_their_prompts_and_lists_share_none():
    import random

    from tools.shapes_world import LINES, TAGS, make_prompt_lists, render, scene_for

    lists = make_prompt_lists(0)
    texts = {name: {m["prompt"] for m in lines} for name, lines in lists.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["heldout"]
    assert not texts["val"] & texts["heldout"]
    for name, lines in lists.items():
        assert len(lines) == LINES[name]
        shares = [sum(m["tag"] == tag for m in lines) for tag in TAGS]
        assert max(shares) - min(shares) <= 1, (name, shares)  # the six tags in equal shares
    rng = random.Random(0)
    sample = lists["heldout"][::8] + lists["train"][::60]  # every tag of both lists
    images = [render(scene_for(m, rng)) for m in sample]
    for name in ("geneval_shapes", "geneval_shapes_poly"):  # the trained reward and the unseen metric
        rewards, info = reward.make_reward(name)(images, [json.dumps(m) for m in sample])
        assert rewards.tolist() == [1.0] * len(sample), name
        assert info["geneval/correct"].tolist() == [1.0] * len(sample), name


def test_shapes_reward_checks_prompts_against_the_shapes_vocabulary():
    reward.check_prompts("geneval_shapes", ['{"tag": "single_object", "include": [{"class": "cross", "count": 1}]}'])
    with pytest.raises(ValueError, match="prompt 1 cannot be scored by the geneval_shapes reward.*'dog'"):
        reward.check_prompts("geneval_shapes", ['{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}'])
    with pytest.raises(ValueError, match="'cross'"):  # and the COCO reward refuses the shapes
        reward.check_prompts("geneval", ['{"tag": "single_object", "include": [{"class": "cross", "count": 1}]}'])


# ---------------------------------------------------------------------------------------------------------------
# Model-backed GenEval (geneval.py: the Mask2Former detector and the CLIP colour classifier) on tiny RANDOM models
# built from configs, saved with save_pretrained and loaded back through the factories' from_pretrained path.
# ---------------------------------------------------------------------------------------------------------------


def build_detector(directory, seed=0, num_queries=1, boost_class=None):
    """A tiny random COCO-instance Mask2Former (Swin backbone, 80 classes) + image processor, saved to `directory`.

    boost_class: a class index whose logit is raised by 30 for every query (so the detector is sure of it).
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_mask2former import Mask2FormerImageProcessor

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=80, feature_size=32, mask_feature_size=32,
                               hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, dim_feedforward=32, num_queries=num_queries)
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if boost_class is not None:
        with torch.no_grad():
            model.class_predictor.bias[boost_class] += 30.0
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def outputs(class_logits, mask_logits):
    return SimpleNamespace(class_queries_logits=torch.as_tensor(class_logits, dtype=torch.float32)[None],
                           masks_queries_logits=torch.as_tensor(mask_logits, dtype=torch.float32)[None])


# ---------------------------------------------------------------------------------------------------------------
# Mask2Former post-processing
# ---------------------------------------------------------------------------------------------------------------
def test_instances_scores_boxes_masks_on_known_outputs():
    # Query 0: class 16 ("dog") certain; its mask logit is +2 on a 2x3 block of a 4x4 grid, -2 elsewhere. Query 1:
    # the "no object" class wins outright, so no real class gets a real probability.
    classes = torch.full((2, 81), -20.0)
    classes[0, 16] = 10.0
    classes[1, 80] = 10.0
    masks = torch.full((2, 4, 4), -2.0)
    masks[0, 1:3, 0:3] = 2.0  # rows 1-2, columns 0-2
    found = mask2former_instances(outputs(classes, masks), (4, 4), GENEVAL_OBJECTS, top_k=3)
    assert len(found) == 3
    best = found[0]
    assert best.label == "dog"
    expected_mask = np.zeros((4, 4), dtype=bool)
    expected_mask[1:3, 0:3] = True
    np.testing.assert_array_equal(best.mask, expected_mask)
    assert best.box == (0.0, 1.0, 3.0, 3.0)  # (first column, first row, last column + 1, last row + 1)
    prob = torch.softmax(classes[0], dim=0)[16].item()
    assert best.score == pytest.approx(prob * (1 / (1 + math.exp(-2.0))), rel=1e-5)
    # The no-object class is dropped: every label is one of the 80, and query 1 contributes only ~0 scores.
    assert all(d.label in GENEVAL_OBJECTS for d in found)
    assert all(d.score < 1e-6 for d in found[1:])


def test_instances_drop_no_object_class_before_top_k():
    # The no-object class (last) has the highest logit; it must never be picked, and the softmax includes it.
    classes = torch.tensor([[0.0] * 80 + [5.0]])
    classes[0, 3] = 4.0
    masks = torch.ones((1, 2, 2))
    found = mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=1)
    assert [d.label for d in found] == ["motorcycle"]
    expected = torch.softmax(classes[0], dim=0)[3].item() * torch.sigmoid(torch.tensor(1.0)).item()
    assert found[0].score == pytest.approx(expected, rel=1e-5)


def test_instances_top_k_over_queries_and_classes():
    # Probabilities of (query, class): (1, 5) ~0.73 > (0, 2) ~0.5 (query 0 shares with "no object") > (1, 7)
    # ~0.27 > everything else (~1e-8); top_k=3 picks those, in that order.
    classes = torch.full((2, 81), -10.0)
    classes[0, 2], classes[0, 80] = 8.0, 8.0
    classes[1, 5], classes[1, 7] = 9.0, 8.0
    masks = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 1.0)])
    found = mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=3)
    assert [d.label for d in found] == [GENEVAL_OBJECTS[5], GENEVAL_OBJECTS[2], GENEVAL_OBJECTS[7]]
    # each takes its own query's mask: query 1 (logit 1) for classes 5 and 7, query 0 (logit 3) for class 2
    probs = torch.softmax(classes, dim=1)
    sig = torch.sigmoid(torch.tensor([3.0, 1.0]))
    assert [d.score for d in found] == pytest.approx(
        [(probs[1, 5] * sig[1]).item(), (probs[0, 2] * sig[0]).item(), (probs[1, 7] * sig[1]).item()], rel=1e-5)
    assert len(mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=1000)) == 2 * 80


def test_instances_threshold_at_logit_zero_and_empty_mask():
    classes = torch.full((2, 81), -10.0)
    classes[0, 0], classes[1, 1] = 10.0, 9.0
    # query 0: one pixel exactly 0 (not in the mask), one at 0.01 (in it); query 1: all negative -> empty mask
    masks = torch.tensor([[[0.0, 0.01], [-1.0, -1.0]], [[-0.01, -3.0], [-1.0, -2.0]]])
    found = mask2former_instances(outputs(classes, masks), (2, 2), GENEVAL_OBJECTS, top_k=2)
    np.testing.assert_array_equal(found[0].mask, [[False, True], [False, False]])
    assert found[0].box == (1.0, 0.0, 2.0, 1.0)
    assert found[0].score == pytest.approx(torch.softmax(classes[0], 0)[0].item() * torch.sigmoid(
        torch.tensor(0.01)).item(), rel=1e-5)
    assert not found[1].mask.any()
    assert found[1].score == 0.0 and found[1].box == (0.0, 0.0, 0.0, 0.0)


def test_instances_upsample_bilinear_to_image_size():
    # A 2x2 mask logit map upsampled to an 8-wide, 4-high image (image_size is PIL's (W, H)).
    classes = torch.full((1, 81), -10.0)
    classes[0, 0] = 10.0
    masks = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]])  # right column positive
    found = mask2former_instances(outputs(classes, masks), (8, 4), GENEVAL_OBJECTS, top_k=1)
    detection = found[0]
    assert detection.mask.shape == (4, 8)
    expected_logits = torch.nn.functional.interpolate(masks[None], size=(4, 8), mode="bilinear",
                                                      align_corners=False)[0, 0]
    np.testing.assert_array_equal(detection.mask, (expected_logits > 0).numpy())
    assert detection.mask[:, 4:].all() and not detection.mask[:, :4].any()
    assert detection.box == (4.0, 0.0, 8.0, 4.0)
    inside = torch.sigmoid(expected_logits[expected_logits > 0]).mean().item()
    assert detection.score == pytest.approx(torch.softmax(classes[0], 0)[0].item() * inside, rel=1e-5)


def test_instances_pick_batch_index():
    classes = torch.full((2, 1, 81), -10.0)
    classes[0, 0, 1], classes[1, 0, 2] = 10.0, 10.0
    batch = SimpleNamespace(class_queries_logits=classes, masks_queries_logits=torch.ones((2, 1, 2, 2)))
    assert mask2former_instances(batch, (2, 2), GENEVAL_OBJECTS, top_k=1, index=1)[0].label == GENEVAL_OBJECTS[2]


def test_labels_map_checkpoint_names_and_placeholders():
    coco = {i: name for i, name in enumerate(GENEVAL_OBJECTS)}
    coco.update({64: "mouse", 65: "remote", 66: "keyboard"})
    assert mask2former_labels(coco) == GENEVAL_OBJECTS
    assert mask2former_labels({str(i): f"LABEL_{i}" for i in range(80)}) == GENEVAL_OBJECTS
    swapped = dict(coco)
    swapped[0], swapped[1] = coco[1], coco[0]
    assert mask2former_labels(swapped)[:2] == ("bicycle", "person")
    with pytest.raises(ValueError, match="80"):
        mask2former_labels({i: GENEVAL_OBJECTS[i] for i in range(79)})
    with pytest.raises(ValueError, match="wall"):
        mask2former_labels({**coco, 5: "wall"})


# ---------------------------------------------------------------------------------------------------------------
# CLIP colour classifier
# ---------------------------------------------------------------------------------------------------------------
def test_colour_classifier_returns_a_colour_of_the_crop(clip_dir, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    colour_of = clip_colour_classifier(model, processor, "cpu")
    picture = Image.new("RGB", (40, 30), (200, 10, 10))
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 10:20] = True
    detection = Detection(label="dog", score=0.9, mask=mask, box=(8, 3, 24, 17))

    seen = []
    real_call = type(processor).__call__

    def spy(self, *args, **kwargs):
        if kwargs.get("images") is not None:
            seen.extend(kwargs["images"])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", spy)
    colour = colour_of(picture, detection)
    assert colour in GENEVAL_COLOURS
    # The crop reaches CLIP: the box's size, object pixels red, the rest #999 grey.
    assert len(seen) == 1 and seen[0].size == (16, 14)
    crop = np.asarray(seen[0])
    assert tuple(crop[0, 0]) == GENEVAL_CROP_BACKGROUND
    assert tuple(crop[2 + 5, 2 + 5]) == (200, 10, 10)

    # The pick is the argmax of image . (mean of the 3 templates' normalised text embeddings, re-normalised).
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        pixels = real_call(processor, images=[geneval.colour_crop(picture, detection)], return_tensors="pt")
        image_emb = normalize(model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output, dim=-1)
        scores = []
        for name in GENEVAL_COLOURS:
            texts = [t.format(colour=name, object="dog") for t in geneval.GENEVAL_COLOUR_TEMPLATES]
            tokens = real_call(processor, text=texts, return_tensors="pt", padding=True)
            text_emb = normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            scores.append((image_emb[0] @ normalize(text_emb.mean(0), dim=-1)).item())
    assert colour == GENEVAL_COLOURS[int(np.argmax(scores))]


def test_colour_classifier_averages_normalised_templates_then_renormalises(monkeypatch):
    # Hand-made unit embeddings in 2-D, image embedding (1, 0). Right rule (mean of the 3 templates, re-normalised,
    # argmax of the dot product): orange (0.913). Without re-normalising: red (0.8); first template only or the
    # best template: yellow (0.95).
    vectors = {"red": [(0.8, 0.6)] * 3, "orange": [(0.6, 0.8), (0.6, -0.8), (0.6, 0.8)],
               "yellow": [(0.95, 0.31225), (-1.0, 0.0), (-1.0, 0.0)]}
    table = {template.format(colour=colour, object="kite"): vectors.get(colour, [(0.0, 1.0)] * 3)[i]
             for colour in GENEVAL_COLOURS for i, template in enumerate(geneval.GENEVAL_COLOUR_TEMPLATES)}
    monkeypatch.setattr(geneval, "clip_text_embeddings",
                        lambda model, processor, texts, device=None: torch.tensor([table[t] for t in texts]))
    monkeypatch.setattr(geneval, "clip_image_embeddings",
                        lambda model, processor, images, device=None: torch.tensor([[1.0, 0.0]] * len(images)))
    colour_of = clip_colour_classifier(None, None, "cpu")
    detection = Detection(label="kite", score=0.9, mask=None, box=(0, 0, 4, 4))
    assert colour_of(image(0), detection) == "orange"
    assert colour_of.colours(image(0), [detection, detection]) == ["orange", "orange"]


def test_colour_classifier_caches_text_embeddings_per_object(clip_dir, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    calls = []
    real = geneval.clip_text_embeddings
    monkeypatch.setattr(geneval, "clip_text_embeddings", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    colour_of = clip_colour_classifier(model, processor, "cpu")
    detection = Detection(label="cat", score=0.9, mask=None, box=(0, 0, 10, 10))
    first = colour_of(image(1), detection)
    assert colour_of(image(1), detection) == first
    colour_of(image(2), Detection(label="cup", score=0.9, mask=None, box=(0, 0, 10, 10)))
    assert len(calls) == 2 and len(calls[0]) == 30 and "a photo of a red cat" in calls[0]
    assert "a photo of a pink-colored cup" in calls[1]


# ---------------------------------------------------------------------------------------------------------------
# GenEval reward end to end
# ---------------------------------------------------------------------------------------------------------------
DOG = {"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}
CAT = {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}
RED_DOG = {"prompt": "a photo of a red dog", "tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}


def test_geneval_reward_end_to_end(tmp_path, clip_dir):
    # One query, certain of "dog" (class 16): the detector finds exactly one dog in any image (if its mask is not
    # empty, checked below), so a dog prompt scores 1 and a cat prompt 0.
    detector, processor = build_detector(tmp_path / "det", boost_class=GENEVAL_OBJECTS.index("dog"))
    images = [image(3), image(4, size=(64, 48)), image(5)]
    for picture in images:
        with torch.no_grad():
            out = detector(pixel_values=processor(images=[picture], return_tensors="pt")["pixel_values"])
        assert (out.masks_queries_logits > 0).any(), "pick another seed: the tiny detector's mask is empty"
    fn = geneval_reward(detector=str(tmp_path / "det"), clip=str(clip_dir))
    rewards, info = fn(images, [DOG, json.dumps(CAT), json.dumps(RED_DOG)])
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    assert ((rewards >= 0) & (rewards <= 1)).all()
    assert rewards[:2].tolist() == [1.0, 0.0]
    assert rewards[2].item() in (0.5, 1.0)  # count term 1, colour term 0 or 1
    assert set(info) == {"geneval/correct", "geneval/strict"}
    assert info["geneval/correct"].tolist() == [1.0, 0.0, rewards[2].item() // 1]  # per image: binary verdicts
    assert torch.equal(info["geneval/strict"], info["geneval/correct"])
    again, _ = fn(images, [DOG, json.dumps(CAT), json.dumps(RED_DOG)])
    assert torch.equal(rewards, again)
    with pytest.raises(ValueError, match="JSON"):
        fn(images[:1], ["a photo of a dog"])
    with pytest.raises(ValueError, match="images"):
        fn(images[:2], [DOG])


def test_geneval_reward_partial_credit_is_clipped(tmp_path, clip_dir):
    # Three queries all sure of "dog": the detector finds 3 dogs. One dog wanted: count term 1 - 2 = -1, floored at
    # 0. One dog and three dogs wanted: terms (-1 -> 0, 1), mean 0.5 (0.0 without the floor).
    detector, processor = build_detector(tmp_path / "det", num_queries=3, boost_class=GENEVAL_OBJECTS.index("dog"))
    picture = image(6)
    with torch.no_grad():
        out = detector(pixel_values=processor(images=[picture], return_tensors="pt")["pixel_values"])
    assert (out.masks_queries_logits > 0).flatten(1).any(1).all(), "pick another seed: an empty mask"
    fn = geneval_reward(detector=str(tmp_path / "det"), clip=str(clip_dir))
    both = {"prompt": "a dog and three dogs", "tag": "two_object",
            "include": [{"class": "dog", "count": 1}, {"class": "dog", "count": 3}]}
    rewards, info = fn([picture, picture], [DOG, both])
    assert rewards.tolist() == [0.0, 0.5]
    assert info["geneval/correct"].tolist() == [1.0, 1.0] and info["geneval/strict"].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory,kwarg", [(geneval_reward, "detector"), (pickscore_reward, "model"),
                                           (clipscore_reward, "model")])
def test_missing_local_folder_raises_clear_error(tmp_path, factory, kwarg):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(RuntimeError) as error:
        factory(**{kwarg: missing})
    message = str(error.value)
    assert missing in message and "HF_HUB_OFFLINE" in message and "local folder" in message


def test_broken_local_folder_raises_clear_error(tmp_path, clip_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError) as error:
        geneval_reward(detector=str(tmp_path / "empty"), clip=str(clip_dir))
    assert str(tmp_path / "empty") in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# GenEval training prompts: tools/make_geneval_prompts.py and the shipped data/geneval/train_metadata.jsonl
# ---------------------------------------------------------------------------------------------------------------

SCRIPT = os.path.join(ROOT, "tools", "make_geneval_prompts.py")
EVAL_FILE = os.path.join(ROOT, "data", "geneval", "evaluation_metadata.jsonl")
TRAIN_FILE = os.path.join(ROOT, "data", "geneval", "train_metadata.jsonl")
MIX_TAGS = {"position", "color_attr", "colors", "counting", "two_object"}  # Flow-GRPO's mix: no single_object
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def run_prompt_script(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def request(metadata):
    """Order-free reading of a line, written independently of the script: (tag, clauses, exclude)."""
    include = metadata["include"]
    if metadata["tag"] == "position":
        target, placed = include
        relation = placed["position"][0]
        return "position", min((placed["class"], relation, target["class"]),
                               (target["class"], INVERSE[relation], placed["class"]))
    return (metadata["tag"],
            tuple(sorted(json.dumps(c, sort_keys=True) for c in include)),
            tuple(sorted(json.dumps(c, sort_keys=True) for c in metadata.get("exclude", []))))


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geneval_prompts")
    paths = [tmp / "a.jsonl", tmp / "b.jsonl", tmp / "seed1.jsonl"]
    run_prompt_script(paths[0], "--count", "200", "--seed", "0")
    run_prompt_script(paths[1], "--count", "200", "--seed", "0")
    run_prompt_script(paths[2], "--count", "200", "--seed", "1")
    return paths


@pytest.fixture(scope="module")
def evaluation():
    return read_lines(EVAL_FILE)


def test_geneval_prompt_script_is_deterministic_for_a_seed(small_runs):
    a, b, other_seed = small_runs
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != other_seed.read_bytes()
    assert len(read_lines(a)) == 200


@pytest.mark.parametrize("which", ["small", "shipped"])
def test_geneval_train_prompts_valid_and_disjoint_from_evaluation(which, small_runs, evaluation):
    lines = read_lines(small_runs[0] if which == "small" else TRAIN_FILE)
    eval_prompts = {m["prompt"].strip().lower() for m in evaluation}
    eval_requests = {request(m) for m in evaluation}
    eval_metadata = {json.dumps({k: v for k, v in m.items() if k != "prompt"}, sort_keys=True) for m in evaluation}
    for metadata in lines:
        validate_geneval_metadata(metadata)
        assert set(metadata) <= {"prompt", "tag", "include", "exclude"}
        assert metadata["prompt"].strip().lower() not in eval_prompts, metadata
        assert request(metadata) not in eval_requests, metadata  # also "B and A", "B right of A" for "A left of B"
        assert json.dumps({k: v for k, v in metadata.items() if k != "prompt"}, sort_keys=True) not in eval_metadata


@pytest.mark.parametrize("which", ["small", "shipped"])
def test_geneval_train_prompts_tags_and_counting(which, small_runs):
    lines = read_lines(small_runs[0] if which == "small" else TRAIN_FILE)
    tags = {m["tag"] for m in lines}
    # All six GenEval tags cannot appear: every possible single_object prompt (80 classes) is an evaluation prompt.
    assert tags == MIX_TAGS
    for metadata in lines:
        if metadata["tag"] == "counting":
            (clause,) = metadata["include"]
            assert 2 <= clause["count"] <= 4
            assert metadata["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        else:
            assert "exclude" not in metadata


def test_shipped_geneval_train_prompts_match_the_documented_command(tmp_path):
    # Documented command: python tools/make_geneval_prompts.py (defaults --count 50000 --seed 0; ~5 s on one core);
    # only --out differs, and the output path does not change the content.
    out = tmp_path / "train_metadata.jsonl"
    run_prompt_script(out)
    assert sha256(out) == sha256(TRAIN_FILE)


def test_sd35m_geneval_code_path_runs_one_iteration_with_json_lines_prompts(tmp_path, clip_dir):
    """The sd35m_geneval preset (1 optimizer step per iteration, GenEval metadata prompts, per-tag evaluation,
    unseen CLIPScore) on tiny random models: SD3.5-M's layout, a Mask2Former detector and a CLIP, all local."""
    model, detector = tmp_path / "tiny-sd35m-layout", tmp_path / "detector"
    sd35m_layout_pipeline(str(model))
    build_detector(str(detector), boost_class=GENEVAL_OBJECTS.index("dog"), num_queries=2)
    with open(os.path.join(os.path.dirname(crd.__file__), "data", "geneval", "evaluation_metadata.jsonl")) as f:
        lines = [line.strip() for line in f]
    chosen = [next(line for line in lines if json.loads(line)["tag"] == tag) for tag in ("single_object", "colors")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(chosen) + "\n")
    cfg = dataclasses.replace(
        crd.sd35m_geneval(), model=str(model), prompts=str(prompts), eval_prompts=str(prompts), eval_count=2,
        output_dir=str(tmp_path), height=32, width=32, max_sequence_length=4, prompts_per_iteration=2, group_size=2,
        micro_batch_size=2, num_steps=3, train_timesteps=1, eval_num_steps=2, iterations=1, lora_rank=4,
        lora_alpha=8, eval_rewards="clipscore",
        reward_options=f"geneval.detector={detector},geneval.clip={clip_dir},clipscore.model={clip_dir}")
    assert (cfg.reward, cfg.optimizer_steps_per_iteration) == ("geneval", 1)
    metrics = crd.main(cfg)
    m = metrics[0]
    assert m["train/step"] == 1 and math.isfinite(m["loss/crd"]) and 0 <= m["reward/mean"] <= 1
    assert 0 <= m["reward/geneval/correct"] <= 1 and 0 <= m["eval/clipscore"] <= 1
    for tag in ("single_object", "colors"):  # per-tag evaluation, as the benchmark reports it
        assert 0 <= m[f"eval/tag/{tag}/geneval/correct"] <= 1 and f"eval/tag/{tag}/reward" in m
    result = crd.evaluate_model(dataclasses.replace(cfg, run_name="eval"))
    assert set(result["per_tag"]) == {"single_object", "colors"}
    assert result["tag_mean"]["geneval/correct"] == pytest.approx(
        np.mean([t["geneval/correct"] for t in result["per_tag"].values()]))


def test_tiny_geneval_preset_runs_two_iterations_on_a_shapes_pipeline(tmp_path, monkeypatch):
    """`python crd.py --preset tiny_geneval`, shrunk to 2 iterations, on an untrained pipeline of the shapes
    model's architecture (tools/pretrain_tiny.build_pipeline at 64x64, word-level tokenizer): GenEval prompts of
    the shapes world, the shapes detector's reward, per-tag held-out accuracy and the partial credit logged.
    Without the model the preset says how to make it."""
    from tools.pretrain_tiny import build_pipeline, shapes_words

    model = tmp_path / "shapes-model"
    pipe = build_pipeline(str(tmp_path / "tokenizer"), height=64, max_length=12, words=shapes_words())
    pipe.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)  # pretraining step (3) sets these
    ids = pipe.tokenizer("a photo of a blue cross and a red square").input_ids
    assert len(ids) == 12 and pipe.tokenizer.unk_token_id not in ids  # <bos>, one token per word, <eos>
    pipe.save_pretrained(str(model))
    plumbing.check_model(crd.tiny_geneval().model)  # the shipped model is a pipeline folder
    missing = str(tmp_path / "tiny-sd3-shapes")  # without it, the preset says how to make it
    with pytest.raises(crd.InputError, match="pretrain_tiny.py --world shapes"):
        plumbing.check_model(missing, crd.MODEL_HINTS[crd.tiny_geneval().model])
    cfg = dataclasses.replace(crd.tiny_geneval(), model=str(model), output_dir=str(tmp_path), iterations=2,
                              prompts_per_iteration=2, group_size=4, micro_batch_size=8, lora_rank=4, lora_alpha=8,
                              optimizer_steps_per_iteration=1, eval_count=12, eval_start=38, num_steps=4,
                              eval_num_steps=3, sample_every=1)
    assert (cfg.reward, cfg.height, cfg.width, cfg.eval_rewards) == ("geneval_shapes", 64, 64, "geneval_shapes_poly")
    metrics = crd.main(cfg)
    assert [m["train/step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["loss/crd"]) and 0 <= m["reward/mean"] <= 1 and 0 <= m["reward/geneval/correct"] <= 1
    final = metrics[-1]
    assert final["eval/iteration"] == 2 and 0 <= final["eval/reward"] <= 1
    assert 0 <= final["eval/geneval_shapes_poly"] <= 1  # the unseen detector scores every held-out evaluation
    assert {key.split("/")[2] for key in final if key.startswith("eval/tag/")} == {"single_object", "two_object"}
    assert os.path.isfile(os.path.join(tmp_path, cfg.run_name, "samples_0001.png"))
