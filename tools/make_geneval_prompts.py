"""Write GenEval-style TRAINING prompts, disjoint from the 553 GenEval evaluation prompts.

Output: one JSON object per line in GenEval's metadata format, the same as data/geneval/evaluation_metadata.jsonl:
{"tag", "include", ["exclude",] "prompt"}, each line accepted by geneval.validate_geneval_metadata. Class names,
colours and relations are geneval.GENEVAL_OBJECTS, GENEVAL_COLOURS and GENEVAL_RELATIONS (the same 80 names, in the
same order, as GenEval's prompts/object_names.txt).

Recipe: the one of GenEval's prompts/create_prompts.py (github.com/djghosh13/geneval, commit af4902f), re-implemented
here; every draw is uniform.
- single_object: "a photo of a(n) OBJ"; include OBJ x1. Any of the 80 classes.
- two_object:    "a photo of a(n) A and a(n) B"; include A x1, B x1. (A, B): two different classes.
- counting:      "a photo of N OBJs"; include OBJ xN, exclude OBJ x(N+1). N in {2, 3, 4}, written as a word.
- colors:        "a photo of a(n) COLOUR OBJ"; include OBJ x1 with that colour. OBJ: any class but "person";
                 COLOUR: one of the 10 colours.
- position:      "a photo of a(n) A REL a(n) B"; include B x1, then A x1 with position [REL, 0] (A is placed
                 relative to B, the clause at index 0). (A, B): two different classes; REL: one of
                 "left of", "right of", "above", "below".
- color_attr:    "a photo of a(n) C1 A and a(n) C2 B"; include A x1 colour C1, B x1 colour C2. (A, B): two
                 different classes other than "person"; (C1, C2): two different colours.
Article: "an" before a word starting with a, e, i, o or u, else "a" (the word is the colour when there is one).
Plural: append "es" to a name ending in "s", else "s" (GenEval's rule as is, so "sheeps", "toothbrushs": the
evaluation prompts are written the same way).

Task mix: Flow-GRPO's (github.com/yifan123/flow_grpo, dataset/merge_genevaltask.py, first commit 39d3d2c): weights
position 0.7, counting 0.5, color_attr 0.3, colors 0.1, two_object 0.1, normalised by their sum (1.7); no
single_object. --count lines are shared out by these weights, fractions rounded by largest remainder. Flow-GRPO's
script writes the mix of an out-of-distribution variant (geneval_ood60_20), but it is the only GenEval task mix
that Flow-GRPO ships: its main training file (dataset/geneval/train_metadata.jsonl) was too large to be read here,
so that file's own mix could not be checked. single_object would be empty anyway: GenEval's evaluation set already
holds all 80 of its possible prompts.

Disjointness: a candidate is dropped, and drawn again, when its prompt text or its meaning equals an evaluation
line's. Meaning: the tag with the include / exclude clauses as an unordered set, so that "A and B" also excludes
"B and A" (Flow-GRPO's rule, github.com/yifan123/flow_grpo issue #4), and for position "A left of B" also excludes
"B right of A" (and "above" / "below" likewise). Hence no training prompt occurs in the evaluation file and no
training line has the metadata of an evaluation line. Training lines are drawn independently (with repeats, as
in Flow-GRPO's merge): counting and colors have only 160 and 696 eligible prompts. The lines are shuffled at the end.

Deterministic for a seed (numpy.random.default_rng(--seed)). Prints the lines per tag and the candidates dropped
as duplicates of evaluation lines.

    python tools/make_geneval_prompts.py    # --count 50000 --seed 0 --out data/geneval/train_metadata.jsonl
"""
import argparse
import json
import os
import sys
from collections import Counter

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from geneval import (GENEVAL_COLOURS, GENEVAL_OBJECTS, GENEVAL_RELATIONS,  # noqa: E402
                    validate_geneval_metadata)

EVAL_METADATA = os.path.join(ROOT, "data", "geneval", "evaluation_metadata.jsonl")
DEFAULT_OUT = os.path.join("data", "geneval", "train_metadata.jsonl")

# Flow-GRPO dataset/merge_genevaltask.py: unnormalised weights per tag (normalised by their sum in task_counts).
TASK_MIX = {"position": 0.7, "color_attr": 0.3, "colors": 0.1, "counting": 0.5, "two_object": 0.1}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
MIN_COUNT, MAX_COUNT = 2, 4  # counting: N drawn from MIN_COUNT..MAX_COUNT inclusive, exclude N + 1
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COLOURABLE = tuple(name for name in GENEVAL_OBJECTS if name != "person")  # no "COLOUR person" prompts
MAX_REJECTS = 100_000  # consecutive dropped candidates before a tag is declared impossible


def article(word):
    """'an' before a vowel letter, else 'a' (GenEval's rule)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name):
    """GenEval's plural: 'es' after a final 's', else 's'."""
    return name + ("es" if name.endswith("s") else "s")


def _pick(rng, items, size=None):
    """One item (size None) or `size` different items, uniformly."""
    if size is None:
        return items[int(rng.integers(len(items)))]
    return [items[int(i)] for i in rng.choice(len(items), size=size, replace=False)]


def draw_single_object(rng):
    name = _pick(rng, GENEVAL_OBJECTS)
    return {"tag": "single_object", "include": [{"class": name, "count": 1}],
            "prompt": f"a photo of {article(name)}"}


def draw_two_object(rng):
    a, b = _pick(rng, GENEVAL_OBJECTS, 2)
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {article(a)} and {article(b)}"}


def draw_counting(rng):
    name = _pick(rng, GENEVAL_OBJECTS)
    n = int(rng.integers(MIN_COUNT, MAX_COUNT + 1))
    return {"tag": "counting", "include": [{"class": name, "count": n}],
            "exclude": [{"class": name, "count": n + 1}],
            "prompt": f"a photo of {COUNT_WORDS[n]} {plural(name)}"}


def draw_colors(rng):
    name, colour = _pick(rng, COLOURABLE), _pick(rng, GENEVAL_COLOURS)
    return {"tag": "colors", "include": [{"class": name, "count": 1, "color": colour}],
            "prompt": f"a photo of {article(colour)} {name}"}


def draw_position(rng):
    a, b = _pick(rng, GENEVAL_OBJECTS, 2)
    relation = _pick(rng, GENEVAL_RELATIONS)
    return {"tag": "position",
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of {article(a)} {relation} {article(b)}"}


def draw_color_attr(rng):
    a, b = _pick(rng, COLOURABLE, 2)
    colour_a, colour_b = _pick(rng, GENEVAL_COLOURS, 2)
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": colour_a}, {"class": b, "count": 1, "color": colour_b}],
            "prompt": f"a photo of {article(colour_a)} {a} and {article(colour_b)} {b}"}


DRAW = {"single_object": draw_single_object, "two_object": draw_two_object, "counting": draw_counting,
        "colors": draw_colors, "position": draw_position, "color_attr": draw_color_attr}


def meaning(metadata):
    """Order-free key of what a line asks for: equal keys = the same request, however the prompt orders it."""
    tag, include = metadata["tag"], metadata["include"]
    exclude = frozenset((c["class"], c["count"]) for c in metadata.get("exclude", []))
    if tag == "position":
        (target, placed) = include
        relation = placed["position"][0]
        forward = (placed["class"], relation, target["class"])
        backward = (target["class"], INVERSE_RELATION[relation], placed["class"])
        return tag, min(forward, backward), exclude
    clauses = frozenset((c["class"], c["count"], c.get("color")) for c in include)
    return tag, clauses, exclude


def load_evaluation(path=EVAL_METADATA):
    """The evaluation prompts (lower-cased, stripped) and meanings that training lines must avoid."""
    prompts, meanings = set(), set()
    with open(path) as f:
        for line in f:
            if line.strip():
                metadata = json.loads(line)
                prompts.add(metadata["prompt"].strip().lower())
                meanings.add(meaning(metadata))
    return prompts, meanings


def task_counts(total, mix=TASK_MIX):
    """Split `total` lines by the mix's weights; leftover lines go to the largest fractional parts."""
    weight_sum = sum(mix.values())
    exact = {tag: total * weight / weight_sum for tag, weight in mix.items()}
    counts = {tag: int(value) for tag, value in exact.items()}
    by_fraction = sorted(mix, key=lambda tag: (-(exact[tag] - counts[tag]), list(mix).index(tag)))
    for tag in by_fraction[:total - sum(counts.values())]:
        counts[tag] += 1
    return counts


def generate(count, seed, eval_path=EVAL_METADATA):
    """(lines as dicts in output order, dropped candidates per tag)."""
    rng = np.random.default_rng(seed)
    eval_prompts, eval_meanings = load_evaluation(eval_path)
    lines, dropped = [], Counter()
    for tag, n in task_counts(count).items():
        rejects_in_a_row = 0
        kept = 0
        while kept < n:
            metadata = DRAW[tag](rng)
            if metadata["prompt"].strip().lower() in eval_prompts or meaning(metadata) in eval_meanings:
                dropped[tag] += 1
                rejects_in_a_row += 1
                if rejects_in_a_row >= MAX_REJECTS:
                    raise RuntimeError(f"{tag}: {MAX_REJECTS} candidates in a row were evaluation lines")
                continue
            rejects_in_a_row = 0
            lines.append(validate_geneval_metadata(metadata))
            kept += 1
    order = rng.permutation(len(lines))
    return [lines[int(i)] for i in order], dropped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output JSONL file (default: {DEFAULT_OUT}, under the repository root)")
    parser.add_argument("--count", type=int, default=50000, help="number of lines (default: 50000)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    out = args.out if args.out != DEFAULT_OUT else os.path.join(ROOT, DEFAULT_OUT)

    lines, dropped = generate(args.count, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for metadata in lines:
            f.write(json.dumps(metadata) + "\n")

    per_tag = Counter(metadata["tag"] for metadata in lines)
    distinct = Counter(tag for tag, _ in {(m["tag"], m["prompt"]) for m in lines})
    print(f"wrote {len(lines)} lines to {out} (seed {args.seed})")
    for tag in TASK_MIX:
        print(f"  {tag:<12} {per_tag[tag]:>6} lines, {distinct[tag]:>6} distinct prompts, "
              f"{dropped[tag]:>5} candidates dropped as evaluation duplicates")
    print(f"  total dropped as evaluation duplicates: {sum(dropped.values())}")


if __name__ == "__main__":
    main()
