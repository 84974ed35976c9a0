"""Whole-volume inference: slabs slide along the slice axis and are blended.

nnU-Net's tiling convention in one dimension (DESIGN.md §7a): slab starts every
`step` slices, the last slab flush with the last slice so that every slice is
covered; each slab's logits are weighted by a Gaussian over its slices (sigma =
1/8 of the slab, so central slices dominate) or uniformly, summed, and divided by
the summed weights. Logits are blended, as nnU-Net v2 does, then passed through a
sigmoid. The model runs as one jitted function over a batch of slabs; the host
only loops over slab batches and accumulates.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.ndimage

PredictFn = Callable[[np.ndarray], np.ndarray]  # slabs [N,S,H,W,C] -> logits [N,S,H,W]


def blend_weights(slab: int, mode: str = "gaussian", sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """Per-slice weights of one slab, max 1, strictly positive."""
  if mode == "uniform":
    return np.ones(slab, np.float32)
  if mode != "gaussian":
    raise ValueError(f"eval.blend={mode!r}; expected 'gaussian' or 'uniform'")
  sigma = max(slab * sigma_scale, 1e-6)
  centre = (slab - 1) / 2.0
  w = np.exp(-0.5 * ((np.arange(slab) - centre) / sigma) ** 2)
  w = w / w.max()
  # nnU-Net clamps zeros to the smallest positive weight so no voxel gets weight 0.
  tiny = w[w > 0].min()
  return np.maximum(w, tiny).astype(np.float32)


def slab_starts(num_slices: int, slab: int, step: int) -> list[int]:
  """Start slices of the slabs; the last one ends on the last slice."""
  if step < 1:
    raise ValueError(f"eval.slab_step={step}; expected >= 1")
  if num_slices <= slab:
    return [0]
  starts = list(range(0, num_slices - slab + 1, step))
  if starts[-1] != num_slices - slab:
    starts.append(num_slices - slab)
  return starts


def sliding_slab_logits(volume: np.ndarray, predict_fn: PredictFn, *, slab: int, step: int,
                        blend: str = "gaussian", batch_size: int = 1) -> np.ndarray:
  """Blended logits [S, H, W] of a whole volume `[S, H, W, C]`.

  `batch_size` slabs go through `predict_fn` at a time; the last batch is padded
  by repeating its last slab so the jitted function sees one shape only.
  A volume with fewer slices than a slab is edge-padded and cropped back.
  """
  volume = np.asarray(volume, np.float32)
  num_slices = volume.shape[0]
  if num_slices < slab:
    volume = np.concatenate([volume, np.repeat(volume[-1:], slab - num_slices, axis=0)])
  total = volume.shape[0]
  starts = slab_starts(total, slab, step)
  weights = blend_weights(slab, blend)
  acc = np.zeros(volume.shape[:3], np.float64)
  norm = np.zeros(total, np.float64)
  for b in range(0, len(starts), batch_size):
    chunk = starts[b:b + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    slabs = np.stack([volume[s:s + slab] for s in padded])
    logits = np.asarray(predict_fn(slabs), np.float64)
    if logits.shape != slabs.shape[:4]:
      raise ValueError(f"predict_fn returned {logits.shape}, expected {slabs.shape[:4]}")
    for i, s in enumerate(chunk):
      acc[s:s + slab] += weights[:, None, None] * logits[i]
      norm[s:s + slab] += weights
  out = acc / norm[:, None, None]
  return out[:num_slices].astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
  return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))).astype(np.float32)


def largest_component(mask: np.ndarray) -> np.ndarray:
  """Keeps the largest 26-connected foreground component (nnU-Net's postprocessing)."""
  mask = np.asarray(mask, bool)
  labels, count = scipy.ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
  if count <= 1:
    return mask
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return labels == int(np.argmax(sizes))


def segment(probs: np.ndarray, *, threshold: float = 0.5, keep_largest: bool = False) -> np.ndarray:
  """Probability map -> boolean mask, optionally only its largest component."""
  mask = np.asarray(probs) > threshold
  return largest_component(mask) if keep_largest else mask
