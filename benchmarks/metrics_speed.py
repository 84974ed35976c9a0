"""Seconds per case of `metrics.case_metrics` on the paper's 60x256x256 grid.

Prints one line per scenario: a typical tumor, a whole-breast-sized false
positive, and a worst case (salt-and-pepper prediction over the whole volume,
as an untrained model may give), each the median of several runs.
Run: python -m benchmarks.metrics_speed
"""
import time

import numpy as np
from scipy import ndimage

from rst2g_jax import metrics

SHAPE = (60, 256, 256)
SPACING = (2.5, 0.7, 0.7)


def _ellipsoid(centre, radii):
  z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
  return sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) <= 1.0


def main(repeats: int = 5) -> None:
  rng = np.random.default_rng(0)
  ref = _ellipsoid((30, 120, 100), (8, 30, 25))
  scenarios = {
      "typical tumor (DSC~0.8)": _ellipsoid((31, 125, 104), (8, 28, 27)),
      "large false positive (~0.8 M voxels)": ndimage.binary_dilation(ref, iterations=60),
      "worst case: noise over the volume (30 %)": rng.random(SHAPE) < 0.3,
  }
  for name, pred in scenarios.items():
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      metrics.case_metrics(pred, ref, SPACING)
      times.append(time.perf_counter() - start)
    print(f"{name:45s} {np.median(times) * 1e3:8.1f} ms/case (median of {repeats})")


if __name__ == "__main__":
  main()
