"""Metrics against SimpleITK and brute-force distance computations, plus the empty-mask rules."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from rst2g_jax import metrics

SPACING = (2.5, 0.7, 0.9)  # (z, y, x) mm, anisotropic in all three axes
SHAPE = (12, 22, 26)


def _blobs(rng, count, shape=SHAPE, spacing=SPACING):
  """Union of `count` random ellipsoids (radii in mm), some cut by the volume edge."""
  grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
  extent = np.array(shape) * np.array(spacing)
  mask = np.zeros(shape, bool)
  for _ in range(count):
    centre = rng.uniform(0.0, extent)
    radii = rng.uniform([3.0, 1.5, 1.5], [8.0, 5.0, 5.0])
    mask |= np.sum(((grid - centre) / radii) ** 2, axis=-1) <= 1.0
  return mask


def _pair(seed):
  rng = np.random.default_rng(seed)
  ref = _blobs(rng, 3)
  # A prediction that overlaps the reference partly: reference shifted by a voxel
  # in-plane, one of its blobs' worth eroded away by noise, plus a false-positive blob.
  pred = np.roll(ref, shift=(0, 1, -1), axis=(0, 1, 2)) & (rng.random(SHAPE) < 0.95)
  pred |= _blobs(rng, 1)
  assert ref.any() and pred.any() and (ref & pred).any() and (pred != ref).any()
  return pred, ref


def _image(mask, spacing=SPACING):
  img = sitk.GetImageFromArray(mask.astype(np.uint8))
  img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK is (x, y, z)
  return img


def _brute_surface(mask):
  """Voxels with at least one of 6 face neighbours outside the mask (outside the volume = background)."""
  padded = np.pad(mask, 1, constant_values=False)
  inner = padded[1:-1, 1:-1, 1:-1]
  all_neighbours_in = np.ones_like(mask)
  for axis in range(3):
    for step in (-1, 1):
      all_neighbours_in &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
  return inner & ~all_neighbours_in


def _brute_directed(from_mask, to_mask, spacing=SPACING):
  a = np.argwhere(_brute_surface(from_mask)) * np.asarray(spacing)
  b = np.argwhere(_brute_surface(to_mask)) * np.asarray(spacing)
  return cdist(a, b).min(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_overlap_and_volumes_match_simpleitk(seed):
  pred, ref = _pair(seed)
  m = metrics.case_metrics(pred, ref, SPACING)
  overlap = sitk.LabelOverlapMeasuresImageFilter()
  overlap.Execute(_image(ref), _image(pred))
  assert m["dsc"] == pytest.approx(overlap.GetDiceCoefficient(), rel=1e-12)
  assert m["ji"] == pytest.approx(overlap.GetJaccardCoefficient(), rel=1e-12)
  assert 0.0 < m["dsc"] < 1.0
  n_pred, n_ref = int(pred.sum()), int(ref.sum())
  assert (m["n_pred"], m["n_ref"]) == (n_pred, n_ref)
  assert (m["tp"], m["fp"], m["fn"]) == (
      int((pred & ref).sum()), int((pred & ~ref).sum()), int((~pred & ref).sum()))
  assert m["rvd"] == pytest.approx((n_pred - n_ref) / n_ref, rel=1e-12)
  assert m["abs_rvd"] == pytest.approx(abs(m["rvd"]))
  voxel_cc = np.prod(SPACING) / 1000.0
  assert m["volume_pred_cc"] == pytest.approx(n_pred * voxel_cc)
  assert m["volume_ref_cc"] == pytest.approx(n_ref * voxel_cc)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_hd95_and_assd_match_brute_force(seed):
  pred, ref = _pair(seed)
  m = metrics.case_metrics(pred, ref, SPACING)
  d_pr, d_rp = _brute_directed(pred, ref), _brute_directed(ref, pred)
  hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
  assert m["hd95"] == pytest.approx(hd95, rel=1e-9)
  assert m["assd"] == pytest.approx((d_pr.mean() + d_rp.mean()) / 2.0, rel=1e-9)
  # The directed sets themselves, voxel by voxel (both in raster order).
  got_pr, got_rp = metrics.surface_distances(pred, ref, SPACING)
  np.testing.assert_allclose(got_pr, d_pr, rtol=1e-9)
  np.testing.assert_allclose(got_rp, d_rp, rtol=1e-9)


@pytest.mark.parametrize("seed", [5, 6])
def test_surface_distances_match_simpleitk(seed):
  """Second reading: SimpleITK's face-connected LabelContour as the surface, and
  its exact SignedMaurerDistanceMap of the other mask's contour as the distance."""
  pred, ref = _pair(seed)
  pred, ref = np.pad(pred, 2), np.pad(ref, 2)  # SimpleITK has no "outside is background" rule

  def contour(mask):
    return sitk.LabelContour(_image(mask), fullyConnected=False)

  def directed(a, b):
    dist_to_b = sitk.SignedMaurerDistanceMap(
        contour(b), insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayFromImage(dist_to_b))[sitk.GetArrayFromImage(contour(a)) > 0]

  np.testing.assert_array_equal(sitk.GetArrayFromImage(contour(pred)) > 0, metrics.surface(pred))
  got_pr, got_rp = metrics.surface_distances(pred, ref, SPACING)  # both in raster order
  np.testing.assert_allclose(got_pr, directed(pred, ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_rp, directed(ref, pred), rtol=1e-5, atol=1e-5)
  assert got_pr.max() > 0 and got_rp.max() > 0


def test_known_shift_gives_known_distances():
  ref = np.zeros((10, 10, 10), bool)
  ref[3:7, 3:7, 3:7] = True
  pred = np.roll(ref, 2, axis=0)  # 2 slices of 2.5 mm along z
  m = metrics.case_metrics(pred, ref, SPACING)
  assert m["dsc"] == pytest.approx(0.5) and m["ji"] == pytest.approx(1 / 3)
  assert m["rvd"] == 0.0
  # The far caps are 5 mm from the other cube's surface, the side walls overlap.
  assert 0.0 < m["assd"] < 5.0 and m["hd95"] == pytest.approx(5.0)


def test_rvd_sign():
  ref = np.zeros((6, 8, 8), bool)
  ref[2:4, 2:6, 2:6] = True
  bigger, smaller = ref.copy(), ref.copy()
  bigger[4, 2:6, 2:6] = True
  smaller[3] = False
  assert metrics.case_metrics(bigger, ref, SPACING)["rvd"] == pytest.approx(0.5)
  assert metrics.case_metrics(smaller, ref, SPACING)["rvd"] == pytest.approx(-0.5)
  assert metrics.case_metrics(smaller, ref, SPACING)["abs_rvd"] == pytest.approx(0.5)


def test_empty_mask_conventions():
  empty = np.zeros(SHAPE, bool)
  _, ref = _pair(0)
  both = metrics.case_metrics(empty, empty, SPACING)
  assert (both["dsc"], both["ji"], both["rvd"], both["abs_rvd"]) == (1.0, 1.0, 0.0, 0.0)
  assert math.isnan(both["hd95"]) and math.isnan(both["assd"])
  missed = metrics.case_metrics(empty, ref, SPACING)
  assert (missed["dsc"], missed["ji"], missed["rvd"]) == (0.0, 0.0, -1.0)
  assert math.isnan(missed["hd95"]) and math.isnan(missed["assd"])
  assert missed["fn"] == ref.sum() and missed["tp"] == 0
  false_alarm = metrics.case_metrics(ref, empty, SPACING)
  assert (false_alarm["dsc"], false_alarm["ji"]) == (0.0, 0.0)
  for key in ("rvd", "abs_rvd", "hd95", "assd"):
    assert math.isnan(false_alarm[key]), key


def test_accepts_0_1_arrays_and_rejects_bad_input():
  pred, ref = _pair(1)
  as_bool = metrics.case_metrics(pred, ref, SPACING)
  assert metrics.case_metrics(pred.astype(np.uint8), ref.astype(np.float32), SPACING) == as_bool
  with pytest.raises(ValueError, match="only 0 and 1"):
    metrics.case_metrics(pred * 0.7, ref, SPACING)
  with pytest.raises(ValueError, match="differs from reference shape"):
    metrics.case_metrics(pred[:-1], ref, SPACING)
  with pytest.raises(ValueError, match="3D"):
    metrics.case_metrics(pred[0], ref[0], SPACING)
  with pytest.raises(ValueError, match="spacing"):
    metrics.case_metrics(pred, ref, (1.0, 0.0, 1.0))


def test_summarize_ignores_nans_and_counts_kinds():
  empty = np.zeros(SHAPE, bool)
  pairs = [_pair(0), _pair(1), (empty, empty), (empty, _pair(2)[1]), (_pair(3)[0], empty)]
  cases = [dict(metrics.case_metrics(p, r, SPACING), case_id=f"c{i}") for i, (p, r) in enumerate(pairs)]
  s = metrics.summarize(cases)
  assert s["counts"] == {"cases": 5, "both_empty": 1, "pred_empty": 1, "ref_empty": 1}
  dsc = [c["dsc"] for c in cases]
  assert s["dsc"]["n"] == 5 and s["dsc"]["mean"] == pytest.approx(np.mean(dsc))
  assert s["dsc"]["sd"] == pytest.approx(np.std(dsc, ddof=1))
  hd = [cases[0]["hd95"], cases[1]["hd95"]]
  assert (s["hd95"]["n"], s["hd95"]["n_nan"]) == (2, 3)
  assert s["hd95"]["mean"] == pytest.approx(np.mean(hd))
  assert s["hd95"]["sd"] == pytest.approx(np.std(hd, ddof=1))
  assert (s["rvd"]["n"], s["rvd"]["n_nan"]) == (4, 1)  # only the empty reference is undefined
  assert s["rvd"]["mean"] == pytest.approx(np.mean([c["rvd"] for c in cases[:4]]))
  single = metrics.summarize(cases[:1])
  assert single["assd"]["n"] == 1 and math.isnan(single["assd"]["sd"])
