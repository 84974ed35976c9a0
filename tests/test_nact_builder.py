"""Breast-MRI-NACT-Pilot builder: the real exam, small exams written here, and bad input."""
import json
import re
import pathlib

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

from tests import dicom_factory as factory
from tfds_builders import reader
from tfds_builders.base import CollectionBuilder, GridConfig, ManualDirError
from tfds_builders.breast_mri_nact_pilot import Builder
from tfds_builders.records import CaseError

GRID = factory.Grid()


class TinyNact(Builder):
  """The same builder on a grid the size of the small test exams (the stored grid = source grid)."""
  BUILDER_CONFIGS = [GridConfig(name="tiny", shape=GRID.shape)]


class FileCases(CollectionBuilder):
  """A minimal image-file collection (`<case>/phase*.mha`, `mask.mha`; MetaImage keeps NaN) for the record checks."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [GridConfig(name="tiny", shape=(4, 6, 5))]
  COLLECTION = "Image-file test cases"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Write the cases with `_file_case`."

  def _case_refs(self, dl_manager):
    return [(p.name, p) for p in sorted(self.manual_path(dl_manager).iterdir())]

  def _load_case(self, folder):
    phases = [reader.read_image(p) for p in sorted(folder.glob("phase*.mha"))]
    mask = reader.read_image(folder / "mask.mha", is_mask=True)
    return reader.make_record(phases, mask, self.grid_shape, case_id=folder.name, patient_id=folder.name,
                              phase_times=[-1.0] * len(phases), strata=0, collection="test")


def _build(builder_cls, data_dir, manual_dir, **kwargs):
  builder = builder_cls(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _assert_nothing_written(data_dir: pathlib.Path):
  leftovers = [p for p in data_dir.rglob("*") if "dataset_info.json" in p.name or ".array_record" in p.name]
  assert leftovers == []


# --- the real exam ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_build(nact_sample_dir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("nact_real")
  builder = _build(Builder, data_dir, nact_sample_dir)
  return builder, tfds.data_source("breast_mri_nact_pilot", data_dir=str(data_dir), split="train"), data_dir


def test_real_exam_builds_into_one_record(real_build):
  builder, source, data_dir = real_build
  assert len(source) == 1
  record = source[0]
  assert record["image"].shape == (3, 60, 256, 256)
  np.testing.assert_allclose(record["spacing"], (2.0, 0.703125, 0.703125), rtol=1e-6)  # (z, y, x)
  np.testing.assert_array_equal(record["phase_times"], [-230.0, 177.0, 531.0])
  voxels = int(record["mask"].sum())
  assert voxels == 41105
  ftv_cc = voxels * float(np.prod(record["spacing"].astype(np.float64))) / 1000
  assert abs(ftv_cc / 40.643371582 - 1) < 1e-3  # the site's own value, SEG tag (0117,10B4)
  assert record["case_id"] == b"UCSF-BR-06_T1" and record["patient_id"] == b"UCSF-BR-06"
  assert record["strata"] == 2  # >= 30 cc
  source_geometry = reader.Geometry.from_dict(record["source_geometry"])
  assert source_geometry.size == (256, 256, 60)
  np.testing.assert_allclose(source_geometry.origin, (157.800003, -106.699997, 78.0), atol=1e-5)
  np.testing.assert_allclose(source_geometry.direction, (0, 0, -1, 1, 0, 0, 0, -1, 0), atol=1e-9)
  # Scanner intensities, no normalisation: the pre-contrast phase is the raw signal.
  assert record["image"].dtype == np.float32 and record["image"][0].max() > 100
  assert builder.info.metadata["cases"] == [{
      "case_id": "UCSF-BR-06_T1", "patient_id": "UCSF-BR-06", "strata": 2, "collection": "UCSF",
      "num_phases": 3, "tumor_voxels": 41105}]


def test_real_exam_output_has_no_patient_name(real_build):
  _, _, data_dir = real_build
  text = "".join(p.read_text() for p in data_dir.rglob("*.json"))
  assert "Breast-MRI-NACT-Pilot^" not in text and "06^" not in text


# --- small exams written by the test ------------------------------------------------------
def test_small_exams_build_with_visits_and_exact_mask(tmp_path):
  manual = tmp_path / "download"
  phases, ftv, _ = factory.write_nact_exam(manual / "a", patient_id="UCSF-BR-98", time_point="T2", seed=1)
  factory.write_nact_exam(manual / "b", patient_id="UCSF-BR-98", time_point="T1", seed=2)
  builder = _build(TinyNact, tmp_path / "data", manual)
  source = builder.as_data_source(split="train")
  assert [r["case_id"] for r in (source[0], source[1])] == [b"UCSF-BR-98_T1", b"UCSF-BR-98_T2"]
  record = source[1]
  np.testing.assert_array_equal(record["mask"], ftv)
  np.testing.assert_allclose(record["image"], phases, atol=1.0)
  np.testing.assert_array_equal(record["phase_times"], [-200.0, 150.0, 450.0])
  np.testing.assert_allclose(record["spacing"], GRID.spacing, rtol=1e-6)
  assert record["strata"] == 0


def test_exams_without_time_point_are_numbered_by_study_date(tmp_path):
  manual = tmp_path / "download"
  written = {}
  for seed, (sub, date) in enumerate((("x", "20210301"), ("y", "20200101"))):
    written[date], _, paths = factory.write_nact_exam(manual / sub, time_point="", seed=10 + seed)
    for p in [p for ps in paths.values() for p in ps]:
      ds = pydicom.dcmread(p)
      del ds.ClinicalTrialTimePointID
      ds.StudyDate = date
      ds.save_as(p)
  builder = _build(TinyNact, tmp_path / "data", manual)
  assert [c["case_id"] for c in builder.info.metadata["cases"]] == ["UCSF-BR-99_V1", "UCSF-BR-99_V2"]
  source = builder.as_data_source(split="train")
  np.testing.assert_allclose(source[0]["image"], written["20200101"], atol=1.0)  # V1 = the earlier exam
  np.testing.assert_allclose(source[1]["image"], written["20210301"], atol=1.0)


# --- bad input ------------------------------------------------------------------------------
def _two_exams(manual):
  factory.write_nact_exam(manual / "good", patient_id="UCSF-BR-01", seed=5)
  return factory.write_nact_exam(manual / "bad", patient_id="UCSF-BR-02", seed=6)


def _fails_then_skips(tmp_path, manual, message):
  """`fail` raises a one-line CaseError matching `message` and writes nothing; `skip` lists it."""
  with pytest.raises(CaseError, match=message) as e:
    _build(TinyNact, tmp_path / "fail", manual)
  assert "\n" not in str(e.value)
  _assert_nothing_written(tmp_path / "fail")
  builder = _build(TinyNact, tmp_path / "skip", manual, on_bad_case="skip")
  assert [c["case_id"] for c in builder.info.metadata["cases"]] == ["UCSF-BR-01_T1"]
  assert [s[0] for s in builder.skipped] == ["UCSF-BR-02_T1"]
  assert builder.info.metadata["skipped"][0][0] == "UCSF-BR-02_T1"
  assert len(builder.as_data_source(split="train")) == 1


@pytest.mark.parametrize("where", ["pixel_data", "header"])
def test_truncated_dicom_file(tmp_path, where):
  manual = tmp_path / "download"
  _, _, paths = _two_exams(manual)
  victim = paths["dce"][4]
  data = victim.read_bytes()
  victim.write_bytes(data[:-100] if where == "pixel_data" else data[:400])
  expected = ("unreadable DICOM pixel data, file truncated" if where == "pixel_data"
              else "DICOM header is truncated or corrupt")
  _fails_then_skips(tmp_path, manual, f"^UCSF-BR-02_T1: {victim}: {expected}")


def test_missing_phase(tmp_path):
  manual = tmp_path / "download"
  _, _, paths = _two_exams(manual)
  for p in paths["dce"]:  # drop the whole late phase
    if pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber > 2 * GRID.shape[0]:
      p.unlink()
  _fails_then_skips(tmp_path, manual, "^UCSF-BR-02_T1: the DCE series has 2 phases, the site recorded 3")


def test_phase_with_a_missing_slice(tmp_path):
  manual = tmp_path / "download"
  _, _, paths = _two_exams(manual)
  paths["dce"][0].unlink()
  _fails_then_skips(tmp_path, manual, "^UCSF-BR-02_T1: 17 images do not make whole phases of 6 slice positions")


def test_image_and_map_geometry_mismatch(tmp_path):
  manual = tmp_path / "download"
  _, _, paths = _two_exams(manual)
  for p in paths["ser"]:  # SER map written with another pixel spacing
    ds = pydicom.dcmread(p)
    ds.PixelSpacing = ["1.6", "1.25"]
    ds.save_as(p)
  _fails_then_skips(tmp_path, manual, r"^UCSF-BR-02_T1: SER map: spacing \(x,y,z\)")


def test_exam_without_seg(tmp_path):
  manual = tmp_path / "download"
  _, _, paths = _two_exams(manual)
  paths["seg"][0].unlink()
  _fails_then_skips(tmp_path, manual, r"^UCSF-BR-02_T1: no breast VOI \(DICOM SEG\) in the exam")


def test_empty_manual_dir(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ManualDirError, match="Breast-MRI-NACT-Pilot: manual_dir .*empty.*cancerimagingarchive"):
    _build(Builder, tmp_path / "data", tmp_path / "empty")
  _assert_nothing_written(tmp_path / "data")
  (tmp_path / "empty" / "notes.txt").write_text("no DICOM here")
  with pytest.raises(ManualDirError, match="Breast-MRI-NACT-Pilot: no DICOM files below .*cancerimagingarchive"):
    _build(Builder, tmp_path / "data", tmp_path / "empty")
  _assert_nothing_written(tmp_path / "data")


def _file_case(folder, phases, mask):
  folder.mkdir(parents=True)
  for p, phase in enumerate(phases):
    sitk.WriteImage(sitk.GetImageFromArray(phase.astype(np.float32)), str(folder / f"phase{p}.mha"))
  sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8)), str(folder / "mask.mha"))


@pytest.mark.parametrize("fault, message", [
    ("labels", r"^case_b: mask labels \[0, 1, 2\] outside \{0, 1\}"),
    ("nan", "^case_b: image has 2 NaN/Inf voxels"),
])
def test_record_checks_surface_through_the_builder(tmp_path, fault, message):
  rng = np.random.default_rng(0)
  phases = rng.uniform(0, 100, (2, 4, 6, 5))
  mask = (rng.random((4, 6, 5)) < 0.3).astype(np.uint8)
  _file_case(tmp_path / "in" / "case_a", phases, mask)
  if fault == "labels":
    mask = mask.copy()
    mask[0, 0, :2] = 2
  else:
    phases = phases.copy()
    phases[1, 2, 3, 4], phases[0, 0, 0, 0] = np.nan, np.inf
  _file_case(tmp_path / "in" / "case_b", phases, mask)
  with pytest.raises(CaseError, match=message):
    _build(FileCases, tmp_path / "fail", tmp_path / "in")
  _assert_nothing_written(tmp_path / "fail")
  builder = _build(FileCases, tmp_path / "skip", tmp_path / "in", on_bad_case="skip")
  assert [s[0] for s in builder.skipped] == ["case_b"]
  assert [c["case_id"] for c in builder.info.metadata["cases"]] == ["case_a"]
  metadata = json.loads(next((tmp_path / "skip").rglob("1.0.0/metadata.json")).read_text())
  assert metadata["skipped"][0][0] == "case_b"
  assert re.match(message, metadata["skipped"][0][1])


def test_foreign_patient_id_is_refused_without_echoing_it(tmp_path):
  manual = tmp_path / "download"
  factory.write_nact_exam(manual / "good", patient_id="UCSF-BR-01", seed=5)
  factory.write_nact_exam(manual / "other", patient_id="MRN-0042-SMITH", seed=6)
  with pytest.raises(CaseError, match="PatientID is not a Breast-MRI-NACT-Pilot subject id") as e:
    _build(TinyNact, tmp_path / "fail", manual)
  assert "MRN-0042" not in str(e.value)
  builder = _build(TinyNact, tmp_path / "skip", manual, on_bad_case="skip")
  assert [c["case_id"] for c in builder.info.metadata["cases"]] == ["UCSF-BR-01_T1"]
  written = "".join(p.read_text() for p in (tmp_path / "skip").rglob("*.json"))
  assert "MRN-0042" not in written and "PatientID is not" in written
