"""External test-set builder on small cases written here, in the default and a custom layout."""
import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

from tfds_builders.base import ManualDirError
from tfds_builders.records import CaseError
from tfds_builders.zhang_external import Builder, LayoutConfig

SHAPE = (4, 6, 5)
SPACING_XYZ = (0.7, 0.7, 1.5)


class TinyZhang(Builder):
  BUILDER_CONFIGS = [
      LayoutConfig(name="tiny", shape=SHAPE),
      LayoutConfig(name="tiny_custom", shape=SHAPE, case_dir="{centre}/images/{case}",
                   phase_file="{case}_P{phase}.nii.gz", mask_file="labels/{centre}/{case}.nii.gz"),
  ]


def _write(path, array, spacing=SPACING_XYZ):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = sitk.GetImageFromArray(array)
  image.SetSpacing(spacing)
  sitk.WriteImage(image, str(path))


def _case(root, centre, case, num_phases, seed, *, custom=False, mask_spacing=SPACING_XYZ):
  rng = np.random.default_rng(seed)
  phases = rng.uniform(10, 900, (num_phases, *SHAPE)).astype(np.float32)
  mask = (rng.random(SHAPE) < 0.3).astype(np.uint8)
  for p, phase in enumerate(phases):
    _write(root / centre / "images" / case / f"{case}_P{p}.nii.gz" if custom
           else root / centre / case / f"P{p}.nii.gz", phase)
  _write(root / "labels" / centre / f"{case}.nii.gz" if custom else root / f"{centre}_gt" / f"{case}.nii.gz",
         mask, mask_spacing)
  return phases, mask


def _build(data_dir, manual_dir, config="tiny", **kwargs):
  builder = TinyZhang(data_dir=str(data_dir), config=config, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.mark.parametrize("config", ["tiny", "tiny_custom"])
def test_records_equal_what_was_written(tmp_path, config):
  custom = config == "tiny_custom"
  root = tmp_path / "archive"
  written = {"CentreA_001": _case(root, "CentreA", "001", 6, seed=1, custom=custom),
             "CentreB_x7": _case(root, "CentreB", "x7", 4, seed=2, custom=custom)}
  builder = _build(tmp_path / "data", root, config)
  source = builder.as_data_source(split="train")
  assert [source[i]["case_id"] for i in range(len(source))] == [b"CentreA_001", b"CentreB_x7"]
  for i, (cid, (phases, mask)) in enumerate(written.items()):
    record = source[i]
    np.testing.assert_allclose(record["image"], phases, rtol=1e-6)  # P0, P1, ... in order
    np.testing.assert_array_equal(record["mask"], mask)
    np.testing.assert_allclose(record["spacing"], SPACING_XYZ[::-1], rtol=1e-6)
    np.testing.assert_array_equal(record["phase_times"], [-1.0] * len(phases))
    assert record["patient_id"] == cid.encode() and record["strata"] == i
    assert record["collection"] == cid.split("_")[0].encode()
  assert builder.skipped == []


@pytest.mark.parametrize("fault, message", [
    ("missing_phase", r"^CentreB_x7: phase file\(s\) P2.nii.gz missing in .*x7 \(found P0.nii.gz, P1.nii.gz, P3.nii.gz\)"),
    ("missing_mask", r"^CentreB_x7: mask CentreB_gt/x7.nii.gz not found below .* \(expected phases "),
    ("geometry", r"^CentreB_x7: mask: spacing \(x,y,z\)"),
    ("truncated", r"^.*x7/P1.nii.gz: unreadable image file"),
])
def test_bad_case_fails_or_is_skipped(tmp_path, fault, message):
  root = tmp_path / "archive"
  _case(root, "CentreA", "001", 3, seed=3)
  _case(root, "CentreB", "x7", 4, seed=4, mask_spacing=(0.7, 0.8, 1.5) if fault == "geometry" else SPACING_XYZ)
  if fault == "missing_phase":
    (root / "CentreB" / "x7" / "P2.nii.gz").unlink()
  elif fault == "missing_mask":
    (root / "CentreB_gt" / "x7.nii.gz").unlink()
  elif fault == "truncated":
    path = root / "CentreB" / "x7" / "P1.nii.gz"
    path.write_bytes(path.read_bytes()[:50])
  with pytest.raises(CaseError, match=message) as e:
    _build(tmp_path / "fail", root)
  assert "\n" not in str(e.value)
  builder = _build(tmp_path / "skip", root, on_bad_case="skip")
  assert [c["case_id"] for c in builder.info.metadata["cases"]] == ["CentreA_001"]
  assert [s[0] for s in builder.skipped] == ["CentreB_x7"]


def test_missing_manual_dir_and_unmatched_layout(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ManualDirError, match=r"manual_dir .*empty.*expected layout: phases <manual_dir>/\{centre\}/\{case\}/P\{phase\}.nii.gz.*zenodo.8068383"):
    _build(tmp_path / "data", tmp_path / "empty")
  other = tmp_path / "other"
  _write(other / "site1" / "pat1" / "dyn_0.nii.gz", np.zeros(SHAPE, np.float32))
  with pytest.raises(ManualDirError, match=r"no case folders \{centre\}/\{case\} holding P0.nii.gz below .*other; "
                                           r"expected .*; found folders \['site1', 'site1/pat1'\]"):
    _build(tmp_path / "data", other)
