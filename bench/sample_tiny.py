"""Time sampling 16 images (10 Euler steps, no CFG, VAE decode included) from the embedded tiny model on the CPU.

    python bench/sample_tiny.py      # prints the median of 5 timed runs after one warm-up
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import crd  # noqa: E402
import plumbing  # noqa: E402

pipe = plumbing.load_pipeline(crd.TINY_MODEL)
prompts = plumbing.read_prompts(os.path.join(crd.TINY_DATA, "heldout.txt"))[:16]
times = []
for run in range(6):
    start = time.perf_counter()
    images = plumbing.generate(pipe, prompts, range(16), 32, 96, 10, 1.0, 2)
    if run:
        times.append(time.perf_counter() - start)
print(f"16 images, 10 steps, no CFG: median {statistics.median(times):.2f}s over {len(times)} runs "
      f"({torch.get_num_threads()} torch threads)")
