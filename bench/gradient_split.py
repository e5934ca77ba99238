"""CRD's training with the gradient split of its two loss terms logged (an opt-in diagnostic outside the training path).

crd.main with diagnostics.gradient_split as update's probe: on the first pass of every iteration, before its
backward, the L2 norms of the reward term's gradient g_R and of the KL anchor's g_KL with respect to theta's LoRA
weights, their cosine and the pass's sigma join the iteration's line of metrics.jsonl (grad/reward_norm,
grad/kl_norm, grad/cos_reward_kl, grad/sigma). It costs two extra backward passes per iteration and changes nothing
the run trains (test_crd.py checks it). Takes crd.py's flags:

    python bench/gradient_split.py --reward ocr --iterations 30 --run-name crd-grad-split
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import crd  # noqa: E402
import diagnostics  # noqa: E402
import plumbing  # noqa: E402

if __name__ == "__main__":
    sys.exit(plumbing.cli(functools.partial(crd.main, probe=diagnostics.gradient_split), crd.evaluate_model,
                          crd.Config, crd.PRESETS, description=__doc__.split("\n")[0]))
