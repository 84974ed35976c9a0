"""The one record layout that every collection builder writes (DESIGN.md §2).

A record is one DCE-MRI exam. Axis order everywhere is (z, y, x) = (slice, row,
column); `image` is [T, S, H, W] with a dynamic number of phases T.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


class CaseError(ValueError):
  """A case that cannot become a valid record. The message names the case."""


def features(num_slices: int, height: int, width: int) -> tfds.features.FeaturesDict:
  """Feature spec of a record on a stored grid of `num_slices x height x width`."""
  zlib = tfds.features.Encoding.ZLIB
  vec = lambda n, dtype: tfds.features.Tensor(shape=(n,), dtype=dtype)
  return tfds.features.FeaturesDict({
      # Scanner intensity scale, no normalisation at build time.
      "image": tfds.features.Tensor(
          shape=(None, num_slices, height, width), dtype=np.float32, encoding=zlib),
      "mask": tfds.features.Tensor(
          shape=(num_slices, height, width), dtype=np.uint8, encoding=zlib),
      "case_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "spacing": vec(3, np.float32),            # (z, y, x) mm of the stored grid
      "phase_times": vec(None, np.float32),     # seconds from injection, -1 unknown
      "strata": tfds.features.Scalar(dtype=np.int64),
      "collection": tfds.features.Text(),       # sub-collection / centre
      # Geometry of the original image (SimpleITK convention, x-y-z order) so that
      # predictions can be resampled back onto it.
      "source_geometry": {
          "origin": vec(3, np.float64),
          "spacing": vec(3, np.float64),
          "direction": vec(9, np.float64),
          "size": vec(3, np.int64),
      },
      # Geometry of the stored grid in the same convention.
      "grid_geometry": {
          "origin": vec(3, np.float64),
          "spacing": vec(3, np.float64),
          "direction": vec(9, np.float64),
          "size": vec(3, np.int64),
      },
  })


def check_case(case: dict, shape: tuple[int, int, int]) -> dict:
  """Validates one case before it is written; raises CaseError naming the case.

  Checks the things that would otherwise become silent garbage downstream: the
  grid shape, at least two phases, finite intensities, a binary mask, and one
  phase time per phase.
  """
  cid = case.get("case_id", "<unknown case>")
  image = np.asarray(case["image"])
  mask = np.asarray(case["mask"])
  if image.ndim != 4 or tuple(image.shape[1:]) != tuple(shape):
    raise CaseError(f"{cid}: image has shape {image.shape}, expected [T, {', '.join(map(str, shape))}]")
  if image.shape[0] < 2:
    raise CaseError(f"{cid}: {image.shape[0]} phase(s), expected a pre-contrast and at least one post-contrast phase")
  if not np.all(np.isfinite(image)):
    bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    raise CaseError(f"{cid}: image has {bad} NaN/Inf voxels")
  if tuple(mask.shape) != tuple(shape):
    raise CaseError(f"{cid}: mask has shape {mask.shape}, expected {tuple(shape)}")
  labels = np.unique(mask)
  if not np.all(np.isin(labels, (0, 1))):
    raise CaseError(f"{cid}: mask labels {labels.tolist()[:8]} outside {{0, 1}}")
  times = np.asarray(case["phase_times"], np.float32)
  if times.shape != (image.shape[0],):
    raise CaseError(f"{cid}: {times.shape[0] if times.ndim else 0} phase times for {image.shape[0]} phases")
  out = dict(case)
  out["image"] = image.astype(np.float32, copy=False)
  out["mask"] = mask.astype(np.uint8, copy=False)
  out["phase_times"] = times
  return out
