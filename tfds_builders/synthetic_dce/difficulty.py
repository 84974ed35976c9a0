"""How hard the phantom is for the simplest baseline: one threshold on the residual.

The synthetic task must need kinetics and shape, so a threshold on the early
residual (post - pre, normalised as the input pipeline does by default) must not
segment the tumor well. This module measures that baseline's best Dice.
"""
from __future__ import annotations

import numpy as np


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
  hist, edges = np.histogram(values, bins=bins)
  centres = (edges[:-1] + edges[1:]) / 2
  weight = np.cumsum(hist)
  mean = np.cumsum(hist * centres)
  total, total_mean = weight[-1], mean[-1]
  w0, w1 = weight[:-1], total - weight[:-1]
  valid = (w0 > 0) & (w1 > 0)
  between = np.zeros_like(centres[:-1], dtype=np.float64)
  m0 = mean[:-1][valid] / w0[valid]
  m1 = (total_mean - mean[:-1][valid]) / w1[valid]
  between[valid] = w0[valid] * w1[valid] * (m0 - m1) ** 2
  return float(centres[np.argmax(between)])


def normalised_residual(image: np.ndarray, post_phase: int = 1) -> np.ndarray:
  """(post - pre) / std of pre inside the body (pre above its Otsu threshold)."""
  pre, post = image[0].astype(np.float64), image[post_phase].astype(np.float64)
  body = pre > otsu_threshold(pre.ravel())
  return ((post - pre) / (pre[body].std() + 1e-6)).astype(np.float32)


def threshold_dice(residuals, masks, num_thresholds: int = 200) -> dict[str, float]:
  """Best Dice of `residual > t` over paired residual/mask arrays (any shape, flattened).

  pooled: one t for all cases (Dice of the pooled voxels); oracle: the best t per
  case, Dice averaged over cases (an upper bound no single rule reaches).
  """
  residuals = [np.asarray(r, np.float32).ravel() for r in residuals]
  masks = [np.asarray(m).ravel().astype(bool) for m in masks]
  grid = np.quantile(np.concatenate(residuals), np.linspace(0.5, 0.9995, num_thresholds))
  tp = np.zeros((len(residuals), grid.size))
  pred = np.zeros_like(tp)
  for i, (r, m) in enumerate(zip(residuals, masks)):
    above = r[None, :] > grid[:, None]
    tp[i] = (above & m[None, :]).sum(1)
    pred[i] = above.sum(1)
  truth = np.array([m.sum() for m in masks], np.float64)[:, None]
  pooled = 2 * tp.sum(0) / (pred.sum(0) + truth.sum())
  per_case = 2 * tp / np.maximum(pred + truth, 1)
  return {"pooled_dice": float(pooled.max()), "pooled_threshold": float(grid[np.argmax(pooled)]),
          "oracle_per_case_dice": float(per_case.max(1).mean())}


def residual_threshold_dice(cases, post_phase: int = 1, num_thresholds: int = 200) -> dict[str, float]:
  """`threshold_dice` of the normalised early residual of record dicts (`image`, `mask`)."""
  cases = list(cases)
  return threshold_dice([normalised_residual(np.asarray(c["image"]), post_phase) for c in cases],
                        [c["mask"] for c in cases], num_thresholds)
