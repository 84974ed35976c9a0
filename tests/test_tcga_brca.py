"""TCGA-BRCA builder on small DICOM studies, a series key and lesion files written here."""
import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds

from tests import dicom_factory as factory
from tfds_builders.base import ManualDirError
from tfds_builders.records import CaseError
from tfds_builders.tcga_brca import Builder, TcgaConfig

GRID = factory.Grid()                      # (z, y, x) = (6, 12, 10)
KEY = """explanations:
  series:
    multiVolumeT1: A single volume with multiple volumes inside.
subjects:
  TCGA-AR-A1AQ:
    studies:
      11-21-2001-MRI - BREAST-98628:
        lateralityType: multiVolumeBilateral
        series:
          8: multiVolumeT1
  TCGA-E2-A105:
    studies:
      05-03-2001-MR BREAST UNILATERAL WWO CONT-21534:
        lateralityType: multiVolumeUnilateralLeft
        series:
          5: t1pre
          6: multiVolumeT1Postcontrast
  TCGA-EW-A1P0:
    studies:
      12-23-1999-BreastBil tumor ax-02182:
        lateralityType: bilateral
        series:
          2: t1pre
          3: t1c1
          4: t1c2
          5: t1c2_sub
      03-01-2000-BreastBil tumor ax-11111:
        lateralityType: bilateral
        series:
          2: t1pre
          3: t1c1
  TCGA-AR-A254:
    studies:
      05-15-2002-MRI Breast Biopsy-41794:
        comment: Breast biopsy MR, unilateral, for exclusion.
  TCGA-BH-A0AW:
    studies:
      02-19-2002-BREAST MRI-78041:
        lateralityType: multiVolumeBilateral
        series:
          4: multiVolumeT1
"""


class TinyTcga(Builder):
  BUILDER_CONFIGS = [TcgaConfig(name="tiny", shape=GRID.shape),
                     TcgaConfig(name="tiny_position", shape=GRID.shape, lesion_z="slice_position")]


def _volumes(seed, num_phases):
  rng = np.random.default_rng(seed)
  pre = factory.smooth_volume(GRID.shape, rng)
  return np.stack([pre * (1 + 0.3 * p) for p in range(num_phases)])


def _build(data_dir, manual_dir, config="tiny", **kwargs):
  builder = TinyTcga(data_dir=str(data_dir), config=config, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _lesion_box():
  voxels = np.zeros((2, 3, 4), np.uint8)          # (z, y, x) box at z 1-2, y 4-6, x 3-6
  voxels[0, 1, 1:3] = 1
  voxels[1, :, 2] = 1
  return (1, 4, 3), voxels


def _write_download(root):
  """Five subjects; returns what the records must hold."""
  (root / "tcga_brca_key.yaml").write_text(KEY)
  start, voxels = _lesion_box()
  written = {}
  # Multi-volume study (all 3 phases in series 8, TriggerTime), instance numbers against the normal.
  study = factory.Study(patient_id="TCGA-AR-A1AQ", study_date="20011121")
  written["TCGA-AR-A1AQ_1"] = phases = _volumes(1, 3)
  factory.write_multivolume(root / "TCGA-AR-A1AQ", study, GRID, phases, series_number=8, bolus_lead_s=30.0, seed=1)
  factory.write_lesion_file(root / "lesions" / "TCGA-AR-A1AQ-S2-1.les", start, voxels)
  factory.write_multivolume(root / "TCGA-AR-A1AQ-later", factory.Study(patient_id="TCGA-AR-A1AQ", study_date="20030507"),
                            GRID, _volumes(9, 2), series_number=8, seed=9)   # not in the key
  # t1pre (series 5) + multi-volume post-contrast series 6 with 2 phases.
  study = factory.Study(patient_id="TCGA-E2-A105", study_date="20010503")
  written["TCGA-E2-A105_1"] = phases = _volumes(2, 3)
  factory.write_volume(root / "TCGA-E2-A105", study, GRID, phases[0], folder="pre", series_number=5, seed=2)
  factory.write_multivolume(root / "TCGA-E2-A105", study, GRID, phases[1:], series_number=6, seed=3)
  factory.write_lesion_file(root / "lesions" / "TCGA-E2-A105.les", start, voxels)
  # One series per phase (series 2, 3, 4 = t1pre, t1c1, t1c2) and a later study of the same subject.
  study = factory.Study(patient_id="TCGA-EW-A1P0", study_date="19991223")
  written["TCGA-EW-A1P0_1"] = phases = _volumes(4, 3)
  factory.write_dce(root / "TCGA-EW-A1P0", study, GRID, phases, layout="series_per_phase", seed=4)
  later = factory.Study(patient_id="TCGA-EW-A1P0", study_date="20000301")
  factory.write_dce(root / "TCGA-EW-A1P0b", later, GRID, _volumes(5, 2), layout="series_per_phase", seed=5)
  factory.write_lesion_file(root / "TCGA-EW-A1P0-1.les", start, voxels)
  # Excluded by the key; and a keyed subject without a lesion file.
  factory.write_multivolume(root / "x", factory.Study(patient_id="TCGA-AR-A254", study_date="20020515"), GRID,
                            _volumes(6, 2), series_number=3, seed=6)
  factory.write_multivolume(root / "y", factory.Study(patient_id="TCGA-BH-A0AW", study_date="20020219"), GRID,
                            _volumes(7, 2), series_number=4, seed=7)
  return written


@pytest.fixture(scope="module")
def download(tmp_path_factory):
  root = tmp_path_factory.mktemp("tcga")
  return root, _write_download(root)


def _expected_mask(against_normal):
  """The lesion's voxels where they belong: z counts instances, which run against the normal."""
  start, voxels = _lesion_box()
  mask = np.zeros(GRID.shape, np.uint8)
  for dz in range(voxels.shape[0]):
    z = start[0] + dz
    k = GRID.shape[0] - 1 - z if against_normal else z
    mask[k, start[1]:start[1] + 3, start[2]:start[2] + 4] = voxels[dz]
  return mask


def test_records_and_skips(download, tmp_path):
  root, written = download
  builder = _build(tmp_path / "data", root)        # on_bad_case="fail": the skips below are not failures
  source = builder.as_data_source(split="train")
  ids = [source[i]["case_id"].decode() for i in range(len(source))]
  assert ids == ["TCGA-AR-A1AQ_1", "TCGA-E2-A105_1", "TCGA-EW-A1P0_1"]
  for i, cid in enumerate(ids):
    record = source[i]
    np.testing.assert_allclose(record["image"], written[cid], atol=1.0)   # phases in order (rescale 2)
    np.testing.assert_allclose(record["spacing"], GRID.spacing, rtol=1e-6)
    assert record["patient_id"] == cid[:-2].encode() and record["collection"] == cid.split("-")[1].encode()
  # Multi-volume: the box is placed through the instance order (against the normal).
  np.testing.assert_array_equal(source[0]["mask"], _expected_mask(against_normal=True))
  np.testing.assert_array_equal(source[0]["phase_times"], [30.0, 120.0, 210.0])
  # Series per phase (scrambled instance numbers): z counts t1pre's images by InstanceNumber.
  pre = [pydicom.dcmread(p, stop_before_pixels=True) for p in (root / "TCGA-EW-A1P0").rglob("*.dcm")]
  pre = [ds for ds in pre if ds.SeriesNumber == 2]
  along_normal = sorted(pre, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), GRID.normal)))
  by_instance = sorted(pre, key=lambda ds: int(ds.InstanceNumber))
  start, voxels = _lesion_box()
  expected = np.zeros(GRID.shape, np.uint8)
  for dz in range(voxels.shape[0]):
    k = along_normal.index(by_instance[start[0] + dz])
    expected[k, start[1]:start[1] + 3, start[2]:start[2] + 4] = voxels[dz]
  assert not np.array_equal(expected, _expected_mask(against_normal=False))   # the orders differ here
  np.testing.assert_array_equal(source[2]["mask"], expected)
  np.testing.assert_array_equal(source[2]["phase_times"], [-1.0] * 3)
  assert dict(builder.skipped) == {
      "TCGA-AR-A1AQ_2": "TCGA-AR-A1AQ_2: study not in the series key",
      "TCGA-AR-A254_1": "TCGA-AR-A254_1: excluded by the key (Breast biopsy MR, unilateral, for exclusion.)",
      "TCGA-BH-A0AW_1": "TCGA-BH-A0AW_1: no lesion file for this subject",
      "TCGA-EW-A1P0_2": "TCGA-EW-A1P0_2: no lesion file (the subject's lesion files are placed on its first "
                        "study, TCGA-EW-A1P0_1)",
  }
  assert builder.info.metadata["skipped"] == [list(s) for s in builder.skipped]


def test_lesion_z_by_slice_position(download, tmp_path):
  root, _ = download
  builder = _build(tmp_path / "data", root, config="tiny_position")
  np.testing.assert_array_equal(builder.as_data_source(split="train")[0]["mask"], _expected_mask(against_normal=False))


def _bad_download(tmp_path, fault):
  root = tmp_path / "download"
  root.mkdir()
  (root / "tcga_brca_key.yaml").write_text(KEY)
  start, voxels = _lesion_box()
  good = factory.Study(patient_id="TCGA-AR-A1AQ", study_date="20011121")
  factory.write_multivolume(root / "good", good, GRID, _volumes(1, 3), series_number=8, seed=1)
  factory.write_lesion_file(root / "TCGA-AR-A1AQ.les", start, voxels)
  bad = factory.Study(patient_id="TCGA-EW-A1P0", study_date="19991223")
  paths = factory.write_dce(root / "bad", bad, GRID, _volumes(4, 3), layout="series_per_phase", seed=4)
  factory.write_lesion_file(root / "TCGA-EW-A1P0.les", start, voxels)
  series_of = lambda p: pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber
  if fault == "truncated":
    victim = next(p for p in paths if series_of(p) == 3)
    victim.write_bytes(victim.read_bytes()[:-100])
  elif fault == "missing_phase":
    for p in paths:
      if series_of(p) == 4:
        p.unlink()
  elif fault == "geometry":
    for p in paths:
      if series_of(p) == 3:
        ds = pydicom.dcmread(p)
        ds.PixelSpacing = ["1.6", "1.25"]
        ds.save_as(p)
  elif fault == "lesion_truncated":
    path = root / "TCGA-EW-A1P0.les"
    path.write_bytes(path.read_bytes()[:-3])
  elif fault == "lesion_outside":
    factory.write_lesion_file(root / "TCGA-EW-A1P0.les", (17, 4, 3), voxels)  # 3 phases x 6 slices = 18 images
  return root


@pytest.mark.parametrize("fault, message", [
    ("truncated", r"^TCGA-EW-A1P0_1: .*: unreadable DICOM pixel data, file truncated"),
    ("missing_phase", r"^TCGA-EW-A1P0_1: key series 4 \(t1c2\) is missing from the download"),
    ("geometry", r"^TCGA-EW-A1P0_1: phase 1: spacing \(x,y,z\)"),
    ("lesion_truncated", r"^TCGA-EW-A1P0_1: lesion file .*TCGA-EW-A1P0.les holds 21 voxels, its box .* needs 24"),
    ("lesion_outside", r"^TCGA-EW-A1P0_1: lesion file TCGA-EW-A1P0.les box z 17-18, .* outside the DCE images "
                       r"\(18 images of 12 x 10\)"),
])
def test_bad_study_fails_or_is_skipped(tmp_path, fault, message):
  root = _bad_download(tmp_path, fault)
  with pytest.raises(CaseError, match=message) as e:
    _build(tmp_path / "fail", root)
  assert "\n" not in str(e.value)
  builder = _build(tmp_path / "skip", root, on_bad_case="skip")
  assert [c["case_id"] for c in builder.info.metadata["cases"]] == ["TCGA-AR-A1AQ_1"]
  assert [s[0] for s in builder.skipped] == ["TCGA-EW-A1P0_1"]


def test_multivolume_with_an_incomplete_phase(tmp_path):
  root = _bad_download(tmp_path, "none")
  paths = factory.write_multivolume(root / "c", factory.Study(patient_id="TCGA-BH-A0AW", study_date="20020219"),
                                    GRID, _volumes(8, 3), series_number=4, seed=8)
  factory.write_lesion_file(root / "TCGA-BH-A0AW.les", *_lesion_box())
  next(p for p in paths if float(pydicom.dcmread(p, stop_before_pixels=True).TriggerTime) == 90000).unlink()
  builder = _build(tmp_path / "skip", root, on_bad_case="skip")
  assert dict(builder.skipped)["TCGA-BH-A0AW_1"].startswith(
      "TCGA-BH-A0AW_1: phase 1 (trigger_time=90000.0) has 5 slice positions (5 files), expected 6")


def test_missing_manual_dir_and_key(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ManualDirError, match="TCGA-BRCA: manual_dir .*empty.*tcga_brca_key.yaml"):
    _build(tmp_path / "data", tmp_path / "empty")
  (tmp_path / "empty" / "a.les").write_bytes(b"")
  with pytest.raises(ManualDirError, match=r"series key .*tcga_brca_key.yaml not found; download .*nyukat/MRI_AI"):
    _build(tmp_path / "data", tmp_path / "empty")
  assert not list((tmp_path / "data").rglob("*.array_record*"))
