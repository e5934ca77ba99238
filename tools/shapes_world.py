"""The shapes world: GenEval's six kinds of prompt on 64x64 images of flat shapes, for the CPU GenEval task.

Objects are geneval.SHAPES (circle, square, triangle, cross) in the colours of geneval.SHAPE_PALETTE (six of
GenEval's colour names) on white. Prompts use GenEval's wording and metadata format ({"prompt", "tag", "include",
"exclude"}, djghosh13/geneval prompts/evaluation_metadata.jsonl) for its six tags:

    single_object  "a photo of a circle"                     counting   "a photo of three triangles"
    two_object     "a photo of a cross and a square"         colors     "a photo of a red circle"
    position       "a photo of a circle left of a square"    color_attr "a photo of a blue cross and a red square"

`scene_for(metadata, rng)` draws a layout that satisfies a prompt (colours not named are random, shapes do not
touch) and `render(scene)` draws it with Pillow (4x supersampled, so edges are anti-aliased like a model's);
`make_prompt_lists(seed)` splits every possible prompt into train / val / held-out lists that share no prompt.

    python tools/shapes_world.py        # writes data/tiny_geneval/{train,val,heldout}.jsonl
"""
import argparse
import itertools
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from geneval import SHAPE_BACKGROUND, SHAPE_PALETTE, SHAPES, geneval_relations  # noqa: E402

SIZE = 64                # image side, pixels
GRID = 2                 # shapes stand in the cells of a GRID x GRID grid, at most one per cell
SHAPE_SIZES = (20, 26)   # side of a shape's box, pixels (inclusive range)
JITTER = 1               # a box's centre lies within this many pixels of its cell's centre
GAP = 3                  # at least this many pixels between two shapes' boxes
NUMBERS = {2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# unique prompts of each tag held out for reports / kept for choosing settings; the rest train
HELDOUT = {"single_object": 1, "two_object": 1, "counting": 3, "colors": 5, "position": 10, "color_attr": 40}
VAL = {"single_object": 1, "two_object": 1, "counting": 2, "colors": 3, "position": 6, "color_attr": 20}
LINES = {"train": 1800, "val": 128, "heldout": 256}  # lines per list, tags in equal shares (prompts repeat)


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def all_prompts():
    """Every prompt of the world as GenEval metadata, by tag: {tag: [metadata, ...]} (454 prompts)."""
    colours = list(SHAPE_PALETTE)
    prompts = {tag: [] for tag in TAGS}
    for shape in SHAPES:
        prompts["single_object"].append({"tag": "single_object", "include": [{"class": shape, "count": 1}],
                                         "prompt": f"a photo of a {shape}"})
        for n in NUMBERS:
            prompts["counting"].append({"tag": "counting", "include": [{"class": shape, "count": n}],
                                        "exclude": [{"class": shape, "count": n + 1}],
                                        "prompt": f"a photo of {NUMBERS[n]} {PLURALS[shape]}"})
        for colour in colours:
            prompts["colors"].append({"tag": "colors", "include": [{"class": shape, "count": 1, "color": colour}],
                                      "prompt": f"a photo of {article(colour)} {colour} {shape}"})
    for a, b in itertools.combinations(SHAPES, 2):
        prompts["two_object"].append({"tag": "two_object", "include": [{"class": a, "count": 1},
                                                                      {"class": b, "count": 1}],
                                      "prompt": f"a photo of a {a} and a {b}"})
    for a, b in itertools.permutations(SHAPES, 2):  # "a photo of an A <relation> a B": B is the target, clause 0
        for relation in ("left of", "right of", "above", "below"):
            prompts["position"].append({"tag": "position", "include": [{"class": b, "count": 1},
                                                                      {"class": a, "count": 1,
                                                                       "position": [relation, 0]}],
                                        "prompt": f"a photo of a {a} {relation} a {b}"})
        for ca, cb in itertools.permutations(colours, 2):
            prompts["color_attr"].append({"tag": "color_attr", "include": [{"class": a, "count": 1, "color": ca},
                                                                          {"class": b, "count": 1, "color": cb}],
                                          "prompt": f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}"})
    return prompts


def make_prompt_lists(seed=0):
    """{"train", "val", "heldout"}: lists of metadata with no prompt in two lists; each tag is shuffled with `seed`
    and its first HELDOUT[tag] prompts are held out, the next VAL[tag] validate, the rest train. Each list then
    cycles through its prompts tag by tag to LINES[name] lines, tags in equal shares (a prompt is then drawn as
    often as its tag's share needs, with different noise: held-out, 43 times for the one single-object prompt, about
    once per color_attr prompt)."""
    rng = random.Random(seed)
    unique = {"train": {}, "val": {}, "heldout": {}}
    for tag, items in all_prompts().items():
        items = items[:]
        rng.shuffle(items)
        cut = HELDOUT[tag] + VAL[tag]
        unique["heldout"][tag], unique["val"][tag], unique["train"][tag] = \
            items[:HELDOUT[tag]], items[HELDOUT[tag]:cut], items[cut:]
    lists = {}
    for name, by_tag in unique.items():
        per_tag = [LINES[name] // len(TAGS) + (i < LINES[name] % len(TAGS)) for i in range(len(TAGS))]
        lines = []
        for tag, n in zip(TAGS, per_tag):
            lines += [by_tag[tag][i % len(by_tag[tag])] for i in range(n)]
        lists[name] = lines
    return lists


def scene_for(metadata, rng, tries=1000):
    """A layout satisfying `metadata`: a list of (shape, colour, (x0, y0, x1, y1)) boxes in pixels, one per cell of
    a GRID x GRID grid (side in SHAPE_SIZES, centre within JITTER of the cell's), no two boxes closer than GAP;
    colours the prompt does not name are drawn at random; a "position" clause's box stands in its relation to the
    target's box by `geneval.geneval_relations`. Raises RuntimeError after `tries` rejected layouts (not seen for
    this world's prompts). The coarse grid keeps the world small enough for a CPU-pretrained model to learn."""
    objects = []
    for clause in metadata["include"]:
        objects += [(clause["class"], clause.get("color"), clause.get("position"))] * clause["count"]
    cell = SIZE / GRID
    for _ in range(tries):
        boxes = []
        for index in rng.sample(range(GRID * GRID), len(objects)):
            side = rng.randint(*SHAPE_SIZES)
            cx = (index % GRID + 0.5) * cell + rng.randint(-JITTER, JITTER)
            cy = (index // GRID + 0.5) * cell + rng.randint(-JITTER, JITTER)
            x0, y0 = round(cx - side / 2), round(cy - side / 2)
            boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
        inside = all(0 < b[0] and 0 < b[1] and b[2] < SIZE - 1 and b[3] < SIZE - 1 for b in boxes)
        apart = all(a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]
                    for a, b in itertools.combinations(boxes, 2))
        placed = all(position is None or position[0] in geneval_relations(box, boxes[position[1]])
                     for (_, _, position), box in zip(objects, boxes))
        if inside and apart and placed:
            return [(shape, colour or rng.choice(list(SHAPE_PALETTE)), box)
                    for (shape, colour, _), box in zip(objects, boxes)]
    raise RuntimeError(f"no layout found for {metadata['prompt']!r} in {tries} tries")


def render(scene, supersample=4):
    """Draw a scene (from `scene_for`) as a SIZE x SIZE RGB PIL image: filled shapes on SHAPE_BACKGROUND."""
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (SIZE * supersample, SIZE * supersample), SHAPE_BACKGROUND)
    draw = ImageDraw.Draw(big)
    for shape, colour, (x0, y0, x1, y1) in scene:
        fill = SHAPE_PALETTE[colour]
        left, top, right, bottom = (v * supersample for v in (x0, y0, x1 + 1, y1 + 1))
        if shape == "circle":
            draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        elif shape == "square":
            draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(left, bottom - 1), (right - 1, bottom - 1), ((left + right - 1) / 2, top)], fill=fill)
        elif shape == "cross":  # a plus sign with arms a third of its size
            third = (right - left) / 3
            draw.rectangle((left + third, top, right - third - 1, bottom - 1), fill=fill)
            draw.rectangle((left, top + third, right - 1, bottom - third - 1), fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "data", "tiny_geneval"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, lines in make_prompt_lists(args.seed).items():
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in lines)
        print(f"{name}: {len(lines)} lines, {len({m['prompt'] for m in lines})} distinct prompts")


if __name__ == "__main__":
    main()
