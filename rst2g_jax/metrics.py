"""Per-case segmentation metrics (paper eqs. 21-23, HD95, ASSD) and their summary.

Host-side NumPy/SciPy; masks are [S, H, W] = (z, y, x) with spacing (z, y, x) mm.

Conventions (README "Evaluation metrics"; results tables cite this list):
- Overlap: TP = |P ∩ G|, FP = |P \\ G|, FN = |G \\ P| in voxels.
  DSC = 2TP / (2TP + FP + FN) (eq. 21), JI = TP / (TP + FP + FN) (eq. 22).
- RVD = (|P| - |G|) / |G| (eq. 23), signed: negative = under-segmentation.
  `abs_rvd` = |RVD| is given as well because a mean of signed RVDs can be 0
  for a method that is always wrong by the same amount in both directions.
- Surface of a mask = its voxels minus its binary erosion with the 3D
  6-connectivity structuring element (a voxel is on the surface when one of
  its 6 face neighbours is background); outside the volume counts as
  background, so a mask cut by the field of view has a surface there.
- Surface distances are Euclidean, in mm, between voxel centres, using the
  voxel spacing: for every surface voxel of P, the distance to the nearest
  surface voxel of G, and the other way round (as MONAI's
  `get_surface_distance`, via `scipy.ndimage.distance_transform_edt(...,
  sampling=spacing)`).
- HD95 (as MONAI `compute_hausdorff_distance(percentile=95)`): the 95th
  percentile (NumPy's linear interpolation) of each directed set of surface
  distances, then the larger of the two.
- ASSD = (mean d(P->G) + mean d(G->P)) / 2, the mean of the two directed mean
  surface distances (medpy's `assd`). Note: MONAI's symmetric
  `compute_average_surface_distance` instead averages the pooled set, which
  differs when the two surfaces have different numbers of voxels.
- Empty masks:
  * both empty: DSC = JI = 1, RVD = |RVD| = 0, HD95 = ASSD = NaN (undefined);
  * prediction empty, reference not: DSC = JI = 0, RVD = -1, HD95 = ASSD = NaN;
  * reference empty, prediction not: DSC = JI = 0, RVD = |RVD| = NaN,
    HD95 = ASSD = NaN.
  NaN values are left out of the means; `summarize` counts each kind so a
  table can state them. (nnU-Net instead reports Dice = NaN when both masks
  are empty; here such cases are counted in `summarize()["counts"]`.)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

# Per-case values that `summarize` averages (the rest are counts/volumes kept per case).
SUMMARY_KEYS = ("dsc", "ji", "rvd", "abs_rvd", "hd95", "assd", "volume_pred_cc", "volume_ref_cc")

_FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


def _as_mask(array, name: str) -> np.ndarray:
  """A bool [S, H, W] mask; rejects probabilities or labels other than 0/1."""
  a = np.asarray(array)
  if a.ndim != 3:
    raise ValueError(f"{name} mask must be 3D [S, H, W], got shape {a.shape}")
  if a.dtype != bool:
    if not np.all((a == 0) | (a == 1)):
      raise ValueError(
          f"{name} mask must hold only 0 and 1 (threshold probabilities first), "
          f"got values in [{a.min()}, {a.max()}]")
    a = a.astype(bool)
  return a


def _check_spacing(spacing) -> tuple[float, float, float]:
  s = tuple(float(v) for v in np.asarray(spacing, dtype=np.float64).ravel())
  if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
    raise ValueError(f"spacing must be 3 positive finite values (z, y, x) in mm, got {spacing!r}")
  return s


def surface(mask: np.ndarray) -> np.ndarray:
  """Surface voxels: the mask minus its 6-connectivity erosion (outside = background)."""
  return mask & ~ndimage.binary_erosion(mask, structure=_FACE_CONNECTIVITY, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
  """Directed surface distances in mm: (pred surface -> ref surface, ref -> pred).

  Both masks must be non-empty. The work is cropped to the bounding box of
  both masks plus one voxel: every surface voxel lies inside it and the box's
  own border is background or the volume's edge, so the surfaces and the
  nearest-surface distances are the same as on the whole volume, at the cost
  of the tumor's size instead of the volume's.
  """
  union = pred | ref
  lo_hi = [np.flatnonzero(np.any(union, axis=tuple(a for a in range(3) if a != axis)))
           for axis in range(3)]
  box = tuple(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2) for idx in lo_hi)
  surf_pred, surf_ref = surface(pred[box]), surface(ref[box])
  to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
  return to_ref[surf_pred], to_pred[surf_ref]


def case_metrics(pred, ref, spacing) -> dict:
  """All metrics of one case; see the module docstring for the conventions.

  Args:
    pred: predicted mask [S, H, W], bool or 0/1.
    ref: reference mask, same shape.
    spacing: (z, y, x) voxel size in mm.
  Returns:
    dict with float "dsc", "ji", "rvd", "abs_rvd", "hd95", "assd" (mm; NaN when
    undefined), "volume_pred_cc", "volume_ref_cc", and int "tp", "fp", "fn",
    "n_pred", "n_ref" (voxels).
  """
  p, g = _as_mask(pred, "prediction"), _as_mask(ref, "reference")
  if p.shape != g.shape:
    raise ValueError(f"prediction shape {p.shape} differs from reference shape {g.shape}")
  sz, sy, sx = _check_spacing(spacing)
  tp = int(np.count_nonzero(p & g))
  n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(g))
  fp, fn = n_pred - tp, n_ref - tp
  voxel_cc = sz * sy * sx / 1000.0
  nan = float("nan")
  if n_pred == 0 and n_ref == 0:
    dsc = ji = 1.0
    rvd = 0.0
  else:
    dsc = 2.0 * tp / (2 * tp + fp + fn)
    ji = tp / (tp + fp + fn)
    rvd = (n_pred - n_ref) / n_ref if n_ref else nan
  if n_pred and n_ref:
    d_pred_ref, d_ref_pred = surface_distances(p, g, (sz, sy, sx))
    hd95 = float(max(np.percentile(d_pred_ref, 95), np.percentile(d_ref_pred, 95)))
    assd = float((d_pred_ref.mean() + d_ref_pred.mean()) / 2.0)
  else:
    hd95 = assd = nan
  return {
      "dsc": float(dsc), "ji": float(ji), "rvd": float(rvd), "abs_rvd": float(abs(rvd)),
      "hd95": hd95, "assd": assd,
      "tp": tp, "fp": fp, "fn": fn, "n_pred": n_pred, "n_ref": n_ref,
      "volume_pred_cc": n_pred * voxel_cc, "volume_ref_cc": n_ref * voxel_cc,
  }


def summarize(per_case: list[dict]) -> dict:
  """Mean, SD and count of each metric over cases, NaNs left out, plus case counts.

  Returns {metric: {"mean", "sd", "n", "n_nan"}} for each of SUMMARY_KEYS
  (SD is the sample SD, ddof=1; mean/SD are NaN when fewer than 1/2 cases are
  defined) and "counts": {"cases", "both_empty", "pred_empty" (reference not
  empty), "ref_empty" (prediction not empty)}, read from "n_pred"/"n_ref".
  Extra keys in the case dicts (e.g. "case_id") are ignored.
  """
  summary: dict = {}
  for key in SUMMARY_KEYS:
    # None: undefined, as strict JSON files written by the results module store NaN.
    values = np.asarray([np.nan if c[key] is None else c[key] for c in per_case], np.float64)
    defined = values[~np.isnan(values)]
    n = int(defined.size)
    summary[key] = {
        "mean": float(defined.mean()) if n else float("nan"),
        "sd": float(defined.std(ddof=1)) if n > 1 else float("nan"),
        "n": n,
        "n_nan": int(values.size - n),
    }
  pred_empty = [c["n_pred"] == 0 for c in per_case]
  ref_empty = [c["n_ref"] == 0 for c in per_case]
  summary["counts"] = {
      "cases": len(per_case),
      "both_empty": sum(a and b for a, b in zip(pred_empty, ref_empty)),
      "pred_empty": sum(a and not b for a, b in zip(pred_empty, ref_empty)),
      "ref_empty": sum(b and not a for a, b in zip(pred_empty, ref_empty)),
  }
  return summary
