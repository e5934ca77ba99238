"""How far the shapes world's two detectors agree on a model's samples (not on clean renders, where both are exact).

Samples one image per held-out prompt from the base model (theta = pretrained, no CFG, seeds 0, 1, ..., as
`crd.py --eval --preset tiny_geneval`) and scores each with the trained reward (`geneval_shapes`: region features,
CIELAB colour) and the unseen metric (`geneval_shapes_poly`: outline polygon, hue), then prints their means, the
per-image correlation of the partial credits and how often the binary GenEval verdicts agree.

    python bench/detector_agreement.py [--model assets/tiny-sd3-shapes] [--count 256]
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import crd  # noqa: E402
import plumbing  # noqa: E402
import reward  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=crd.SHAPES_MODEL)
    parser.add_argument("--prompts", default=os.path.join(ROOT, "data", "tiny_geneval", "heldout.jsonl"))
    parser.add_argument("--count", type=int, default=256)
    args = parser.parse_args(argv)
    cfg = crd.tiny_geneval()
    pipe = plumbing.load_pipeline(args.model)
    prompts = plumbing.read_prompts(args.prompts)[: args.count]
    images = plumbing.generate(pipe, prompts, range(len(prompts)), cfg.height, cfg.width, cfg.eval_num_steps, 1.0,
                               cfg.max_sequence_length)
    (trained, trained_info), (unseen, unseen_info) = (reward.make_reward(name)(images, prompts)
                                                      for name in ("geneval_shapes", "geneval_shapes_poly"))
    verdicts = trained_info["geneval/correct"].numpy(), unseen_info["geneval/correct"].numpy()
    print(f"{len(prompts)} samples: partial credit {trained.mean():.3f} (geneval_shapes) vs {unseen.mean():.3f} "
          f"(geneval_shapes_poly), per-image correlation {np.corrcoef(trained, unseen)[0, 1]:.2f}; GenEval verdict "
          f"{verdicts[0].mean():.3f} vs {verdicts[1].mean():.3f}, the same on "
          f"{np.mean(verdicts[0] == verdicts[1]):.0%}")


if __name__ == "__main__":
    main()
