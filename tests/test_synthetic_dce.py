"""The synthetic DCE-MRI phantom and its TFDS builder."""
import dataclasses
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from tfds_builders import build as build_lib
from tfds_builders.records import CaseError
from tfds_builders.synthetic_dce import Builder, difficulty, phantom

CONFIGS = Builder.builder_configs
SMALL, TINY, EXTERNAL = CONFIGS["small"], CONFIGS["tiny"], CONFIGS["external"]


@pytest.fixture(scope="module")
def small_cases():
  return [phantom.make_case(i, SMALL) for i in range(SMALL.num_cases)]


def test_default_config_is_small_and_cpu_sized():
  assert Builder.BUILDER_CONFIGS[0].name == "small"
  assert SMALL.shape == (16, 64, 64) and 30 <= SMALL.num_cases <= 40
  assert CONFIGS["paper"].shape == (60, 256, 256)
  assert EXTERNAL.shape == SMALL.shape and EXTERNAL.centre != SMALL.centre
  # The smallest tumor is at least 3 voxels across on every axis of the small grid.
  assert SMALL.tumor_mm[0] / max(SMALL.spacing) >= 3.0


def test_same_seed_same_arrays_other_seed_other_arrays():
  first, again = phantom.make_case(3, TINY), phantom.make_case(3, TINY)
  for key in ("image", "mask", "phase_times", "spacing"):
    np.testing.assert_array_equal(first[key], again[key])
  other = phantom.make_case(3, dataclasses.replace(TINY, seed=TINY.seed + 1))
  assert not np.array_equal(first["image"], other["image"])
  assert not np.array_equal(first["mask"], other["mask"])


def test_record_fields_and_patients_with_two_visits(small_cases):
  for case in small_cases:
    assert case["image"].shape[1:] == SMALL.shape and case["image"].dtype == np.float32
    assert case["mask"].dtype == np.uint8 and set(np.unique(case["mask"])) == {0, 1}
    assert case["image"].min() >= 0 and case["image"].max() > 100   # scanner-like scale
    np.testing.assert_array_equal(case["spacing"], np.float32(SMALL.spacing))
    np.testing.assert_array_equal(case["grid_geometry"]["size"], SMALL.shape[::-1])
  ids = [c["case_id"] for c in small_cases]
  assert len(set(ids)) == len(ids)
  by_patient = {}
  for case in small_cases:
    by_patient.setdefault(case["patient_id"], []).append(case)
  repeated = [v for v in by_patient.values() if len(v) == 2]
  assert len(repeated) >= 3 and len(by_patient) < len(small_cases)
  # Chemotherapy between visits: the second exam's tumor is smaller, in the same place.
  for first, second in repeated:
    assert second["mask"].sum() < first["mask"].sum()
    c1, c2 = (np.array(ndimage.center_of_mass(c["mask"])) for c in (first, second))
    assert np.linalg.norm((c1 - c2) * SMALL.spacing) < 0.5 * phantom.equivalent_diameter_mm(
        first["mask"], SMALL.spacing)


def test_tumor_sizes_and_strata(small_cases):
  low, high = phantom.strata_thresholds_mm(SMALL)
  strata = []
  for case in small_cases:
    labelled, n = ndimage.label(case["mask"])
    largest = np.bincount(labelled.ravel())[1:].max()
    main_mm = (6 * largest * np.prod(SMALL.spacing) / np.pi) ** (1 / 3)
    assert 5.0 <= main_mm <= 40.0, case["case_id"]
    d_eq = phantom.equivalent_diameter_mm(case["mask"], SMALL.spacing)
    assert case["strata"] == int(d_eq >= low) + int(d_eq >= high)
    strata.append(case["strata"])
  assert set(strata) == {0, 1, 2}


def test_phase_times_follow_the_protocol(small_cases):
  for case in small_cases:
    np.testing.assert_array_equal(case["phase_times"], [-60, 150, 450])
    assert case["image"].shape[0] == 3
  counts = set()
  for i in range(8):
    case = phantom.make_case(i, EXTERNAL)
    times = case["phase_times"]
    assert 4 <= times.size <= 6 and times[0] == EXTERNAL.pre_time
    np.testing.assert_array_equal(times[1:], EXTERNAL.post_times[: times.size - 1])
    assert case["image"].shape[0] == times.size
    counts.add(times.size)
  assert len(counts) > 1


def _mean_curve(image, region):
  return np.array([image[k][region].mean() for k in range(image.shape[0])])


def test_tumors_wash_out_parenchyma_persists_necrosis_inside_mask(small_cases):
  necrotic = 0
  for index, case in enumerate(small_cases[:12]):
    labels = phantom.make_labels(index, SMALL)
    image, mask = case["image"], case["mask"].astype(bool)
    # Interior voxels only, so that partial volume and misregistration do not blur the classes.
    tumor = ndimage.binary_erosion(labels == phantom.TUMOR)
    enhancing = (labels == phantom.TUMOR) | (labels == phantom.BLOOD) | (labels >= phantom.FOCUS)
    fgt = ndimage.binary_erosion(labels == phantom.FGT) & ~ndimage.binary_dilation(enhancing, iterations=2)
    tumor_curve, fgt_curve = _mean_curve(image, tumor), _mean_curve(image, fgt)
    if tumor.sum() >= 5:
      assert tumor_curve[1] > 1.3 * tumor_curve[0], case["case_id"]        # fast enhancement
      assert tumor_curve[2] < 0.95 * tumor_curve[1], case["case_id"]       # wash-out
    assert fgt_curve[2] >= 0.98 * fgt_curve[1], case["case_id"]            # persistent
    core = labels == phantom.NECROSIS
    assert np.all(mask[core]), case["case_id"]
    assert not mask[labels >= phantom.FOCUS].any()                         # foci are confounders
    assert not mask[labels == phantom.BLOOD].any()
    necrotic += int(core.any())
  assert necrotic >= 1


def test_one_residual_threshold_does_not_segment_the_tumor(small_cases):
  whole = difficulty.residual_threshold_dice(small_cases)
  assert whole["pooled_dice"] < 0.9 and whole["oracle_per_case_dice"] < 0.9
  # Inside the breast tissue the enhancing tumor stands out (learnable), yet
  # parenchymal enhancement and benign foci keep a threshold well below 0.9.
  residuals, masks = [], []
  for index, case in enumerate(small_cases):
    labels = phantom.make_labels(index, SMALL)
    breast = np.isin(labels, (phantom.FAT, phantom.FGT, phantom.TUMOR, phantom.NECROSIS))
    breast |= labels >= phantom.FOCUS
    residuals.append(difficulty.normalised_residual(case["image"])[breast])
    masks.append(case["mask"][breast])
  inside = difficulty.threshold_dice(residuals, masks)
  assert 0.3 < inside["pooled_dice"] < 0.9
  assert inside["pooled_dice"] > whole["pooled_dice"] + 0.2


def test_builder_writes_what_make_case_returns(tmp_path):
  summary = build_lib.build("synthetic_dce", data_dir=str(tmp_path), config="tiny", num_shards=2,
                            progress=False)
  assert (summary.cases_written, summary.num_shards, summary.skipped) == (6, 2, [])
  import tensorflow_datasets as tfds
  source = tfds.data_source("synthetic_dce/tiny", data_dir=str(tmp_path))["train"]
  assert len(source) == 6
  table = Builder(data_dir=str(tmp_path), config="tiny").info.metadata["cases"]
  for index in (0, 5):
    record, expected = source[index], phantom.make_case(index, TINY)
    np.testing.assert_array_equal(record["image"], expected["image"])
    np.testing.assert_array_equal(record["mask"], expected["mask"])
    np.testing.assert_array_equal(record["phase_times"], expected["phase_times"])
    np.testing.assert_array_equal(record["spacing"], expected["spacing"])
    for key in ("origin", "spacing", "direction", "size"):
      np.testing.assert_array_equal(record["source_geometry"][key], expected["source_geometry"][key])
    assert record["case_id"].decode() == expected["case_id"] == table[index]["case_id"]
    assert record["patient_id"].decode() == expected["patient_id"]
    assert record["strata"] == expected["strata"] == table[index]["strata"]


def _nan_in_case(monkeypatch, bad_index):
  make_case = phantom.make_case

  def broken(index, config):
    case = make_case(index, config)
    if index == bad_index:
      case["image"][1, 0, 0, 0] = np.nan
    return case
  monkeypatch.setattr(phantom, "make_case", broken)


def _leftovers(root: pathlib.Path):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_bad_case_fails_without_leaving_a_dataset(tmp_path, monkeypatch):
  _nan_in_case(monkeypatch, 2)
  with pytest.raises(CaseError, match=r"centre_a-P\d{4}-V\d: image has 1 NaN/Inf voxels"):
    build_lib.build("synthetic_dce", data_dir=str(tmp_path), config="tiny", progress=False)
  assert _leftovers(tmp_path) == []


def test_bad_case_skipped_and_listed(tmp_path, monkeypatch):
  _nan_in_case(monkeypatch, 2)
  summary = build_lib.build("synthetic_dce", data_dir=str(tmp_path), config="tiny",
                            on_bad_case="skip", progress=False)
  bad_id = phantom.case_id(TINY, *phantom.exam_table(TINY)[2])
  assert summary.cases_written == 5
  assert [s[0] for s in summary.skipped] == [bad_id] and "NaN" in summary.skipped[0][1]
  assert f"{bad_id}: " in summary.format() and "cases skipped: 1" in summary.format()
  reused = build_lib.build("synthetic_dce", data_dir=str(tmp_path), config="tiny", progress=False)
  assert reused.reused and reused.cases_written == 5 and reused.skipped == summary.skipped
