"""MAMA-MIA builder on small cases written here in the release's NIfTI layout."""
import json

import numpy as np
import openpyxl
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

from rst2g_jax import splits as splits_lib
from tfds_builders.base import ManualDirError
from tfds_builders.mama_mia import Builder, official_splits
from tfds_builders.mama_mia.mama_mia_dataset_builder import MamaMiaConfig, write_official_splits
from tfds_builders.records import CaseError

SHAPE = (4, 6, 5)                   # (z, y, x) of the written cases = the stored grid
SPACING_XYZ = (0.8, 0.7, 2.0)
ORIGIN = (-30.0, 12.0, 5.0)


class TinyMamaMia(Builder):
  BUILDER_CONFIGS = [MamaMiaConfig(name="tiny", shape=SHAPE),
                     MamaMiaConfig(name="tiny_official", shape=SHAPE, official_split=True)]


def _image(array, spacing=SPACING_XYZ):
  image = sitk.GetImageFromArray(array)
  image.SetSpacing(spacing)
  image.SetOrigin(ORIGIN)
  return image


def _write_case(root, folder, file_id, num_phases, seed, *, mask_name=None, mask_spacing=SPACING_XYZ):
  """Phases `<file_id>_000<p>.nii.gz` in images/<folder>/ and the expert mask; returns (phases, mask)."""
  rng = np.random.default_rng(seed)
  phases = rng.uniform(50, 500, (num_phases, *SHAPE)).astype(np.float32)
  mask = (rng.random(SHAPE) < 0.25).astype(np.uint8)
  (root / "images" / folder).mkdir(parents=True, exist_ok=True)
  for p, phase in enumerate(phases):
    sitk.WriteImage(_image(phase), str(root / "images" / folder / f"{file_id}_{p:04d}.nii.gz"))
  (root / "segmentations" / "expert").mkdir(parents=True, exist_ok=True)
  sitk.WriteImage(_image(mask, mask_spacing), str(root / "segmentations" / "expert" / (mask_name or f"{file_id}.nii.gz")))
  return phases, mask


def _write_clinical(root, rows):
  book = openpyxl.Workbook()
  sheet = book.active
  sheet.title = "dataset_info"
  sheet.append(["patient_id", "dataset", "num_phases", "acquisition_times", "pcr"])
  for row in rows:
    sheet.append(row)
  book.save(root / "clinical_and_imaging_info.xlsx")


def _build(data_dir, manual_dir, config="tiny", **kwargs):
  builder = TinyMamaMia(data_dir=str(data_dir), config=config, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.fixture(scope="module")
def good_release(tmp_path_factory):
  """A 3-phase DUKE case (lower-case names) and a 6-phase ISPY2 case (upper-case), with the sheet."""
  root = tmp_path_factory.mktemp("mama_mia")
  written = {
      "DUKE_001": _write_case(root, "duke_001", "duke_001", 3, seed=1),
      "ISPY2_100": _write_case(root, "ISPY2_100", "ISPY2_100", 6, seed=2, mask_name="ispy2_100.nii.gz"),
      "NACT_01": _write_case(root, "NACT_01", "NACT_01", 4, seed=6),
  }
  _write_clinical(root, [["DUKE_001", "DUKE", 3, "[0, 95, 190]", 1],
                         ["ISPY2_100", "ISPY2", 6, None, 0]])
  (root / "train_test_splits.csv").write_text("train_split,test_split\nDUKE_001,ISPY2_100\nNACT_01,\n")
  return root, written


def test_phases_times_mask_and_ids(good_release, tmp_path):
  root, written = good_release
  builder = _build(tmp_path / "data", root)
  source = builder.as_data_source(split="train")
  assert len(source) == 3
  duke, ispy = source[0], source[1]
  assert duke["case_id"] == b"DUKE_001" and duke["patient_id"] == b"DUKE_001"
  assert ispy["case_id"] == b"ISPY2_100"
  for record, (phases, mask) in zip((duke, ispy, source[2]), written.values()):
    assert record["image"].shape == (len(phases), *SHAPE)
    np.testing.assert_allclose(record["image"], phases, rtol=1e-6)   # phases in order, values kept
    np.testing.assert_array_equal(record["mask"], mask)
    np.testing.assert_allclose(record["spacing"], SPACING_XYZ[::-1], rtol=1e-6)  # (z, y, x)
    np.testing.assert_allclose(record["source_geometry"]["origin"], ORIGIN)
  np.testing.assert_array_equal(duke["phase_times"], [0, 95, 190])
  np.testing.assert_array_equal(ispy["phase_times"], [-1] * 6)       # no times in the sheet
  assert (duke["collection"], duke["strata"]) == (b"DUKE", 0)
  assert (ispy["collection"], ispy["strata"]) == (b"ISPY2", 2)
  assert [(c["case_id"], c["num_phases"], c["strata"]) for c in builder.info.metadata["cases"]] == [
      ("DUKE_001", 3, 0), ("ISPY2_100", 6, 2), ("NACT_01", 4, 3)]
  np.testing.assert_array_equal(source[2]["phase_times"], [-1] * 4)   # not in the sheet
  assert builder.skipped == [] and "official_split" not in builder.info.metadata


def test_official_split_is_kept_and_becomes_the_test_part(good_release, tmp_path):
  root, _ = good_release
  builder = _build(tmp_path / "data", root, config="tiny_official")
  metadata = json.loads(next((tmp_path / "data").rglob("1.0.0/metadata.json")).read_text())
  assert metadata["official_split"] == {"train": ["DUKE_001", "NACT_01"], "test": ["ISPY2_100"]}
  cases = builder.info.metadata["cases"]
  made = official_splits(cases, builder.info.metadata["official_split"], num_folds=2, seed=0)
  assert made["test"] == ["ISPY2_100"] and sorted(made["folds"]) == [["DUKE_001"], ["NACT_01"]]
  with pytest.raises(ValueError, match="2 official training cases cannot make 3 non-empty folds"):
    official_splits(cases, builder.info.metadata["official_split"], num_folds=3)
  path = write_official_splits(builder, tmp_path / "work", num_folds=2, seed=0)
  written = splits_lib.load_splits(path)
  assert written["test"] == ["ISPY2_100"] and written["folds"] == made["folds"]


def test_official_split_config_needs_the_csv(tmp_path):
  root = tmp_path / "release"
  _write_case(root, "NACT_01", "NACT_01", 3, seed=3)
  with pytest.raises(ManualDirError, match="official_split needs train_test_splits.csv"):
    _build(tmp_path / "data", root, config="tiny_official")


def _bad_release(tmp_path, fault):
  root = tmp_path / "release"
  _write_case(root, "DUKE_002", "DUKE_002", 3, seed=4)
  phases, _ = _write_case(root, "NACT_07", "NACT_07", 3, seed=5,
                          mask_spacing=(0.9, 0.7, 2.0) if fault == "geometry" else SPACING_XYZ)
  folder = root / "images" / "NACT_07"
  if fault == "missing_phase":
    (folder / "NACT_07_0001.nii.gz").unlink()
  elif fault == "truncated":
    path = folder / "NACT_07_0002.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
  elif fault == "labels":  # (NaN/Inf cannot reach a record from NIfTI: ITK's reader sets them to 0)
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 2, 2], mask[2, 2, 2] = 1, 2
    sitk.WriteImage(_image(mask), str(root / "segmentations" / "expert" / "NACT_07.nii.gz"))
  elif fault == "sheet_phases":
    _write_clinical(root, [["NACT_07", "NACT", 4, "[0, 150, 450, 600]", 1]])
  return root


@pytest.mark.parametrize("fault, message", [
    ("missing_phase", r"^NACT_07: phase file\(s\) _0001 missing in .*NACT_07 \(found _0000, _0002\)"),
    ("truncated", r"^.*NACT_07_0002.nii.gz: unreadable image file"),
    ("geometry", r"^NACT_07: mask: spacing \(x,y,z\)"),
    ("labels", r"^NACT_07: mask labels \[0, 1, 2\] outside \{0, 1\}"),
    ("sheet_phases", r"^NACT_07: 3 phase files, the clinical sheet records 4 phases"),
])
def test_bad_case_fails_or_is_skipped(tmp_path, fault, message):
  root = _bad_release(tmp_path, fault)
  with pytest.raises(CaseError, match=message) as e:
    _build(tmp_path / "fail", root)
  assert "\n" not in str(e.value)
  builder = _build(tmp_path / "skip", root, on_bad_case="skip")
  assert [c["case_id"] for c in builder.info.metadata["cases"]] == ["DUKE_002"]
  assert [s[0] for s in builder.skipped] == ["NACT_07"]
  assert len(builder.as_data_source(split="train")) == 1


def test_missing_mask_is_named(tmp_path):
  root = _bad_release(tmp_path, "none")
  (root / "segmentations" / "expert" / "NACT_07.nii.gz").unlink()
  builder = _build(tmp_path / "skip", root, on_bad_case="skip")
  assert builder.skipped == [("NACT_07", "NACT_07: expert segmentation segmentations/expert/NACT_07.nii.gz not found")]


def test_missing_or_wrong_manual_dir(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ManualDirError, match="MAMA-MIA: manual_dir .*empty.*images/<ID>/<ID>_0000.nii.gz.*syn60868042"):
    _build(tmp_path / "data", tmp_path / "empty")
  (tmp_path / "empty" / "readme.txt").write_text("x")
  with pytest.raises(ManualDirError, match=r"MAMA-MIA: no images/ folder in .*empty \(found \['readme.txt'\]\)"):
    _build(tmp_path / "data", tmp_path / "empty")
  assert not list((tmp_path / "data").rglob("*.array_record*"))
