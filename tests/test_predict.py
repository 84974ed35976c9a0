"""`python -m rst2g_jax.predict`: studies in, masks in the input's own geometry out.

The model is the tiny RST2G trained for 4 steps on both folds of the synthetic `tiny`
collection (its grid is 8x32x32): what it predicts is not the point, where the outputs
land is.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import types

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from rst2g_jax import inference
from rst2g_jax import input_pipeline
from rst2g_jax import predict
from tests import dicom_factory as df
from tfds_builders import reader
from tfds_builders.records import CaseError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flags(**overrides):
  values = dict(workdir=None, input=None, pre=None, post=None, output=None, folds="all",
                post_phase=None, threshold=None, largest_component=None, mirror_tta=None,
                blend=None, slab_step=None, save_probabilities=False, dicom_seg=True,
                copy_patient_module=False, on_error="fail")
  values.update(overrides)
  return types.SimpleNamespace(**values)


def _same_geometry(a: sitk.Image, b: sitk.Image):
  assert a.GetSize() == b.GetSize()
  np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
  np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
  np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


def _dice(a, b):
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _oblique_geometry(size=(40, 36, 12), spacing=(0.8, 0.9, 2.5)) -> reader.Geometry:
  """A rotated, anisotropic grid, as an oblique NIfTI acquisition has."""
  a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
  rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
  return reader.Geometry((-31.5, 12.25, 40.0), spacing, tuple((rz @ rx).ravel()), size)


def _ellipsoid(shape_zyx, radii_frac=(0.3, 0.3, 0.3)):
  grids = np.meshgrid(*[np.linspace(-0.5, 0.5, s) for s in shape_zyx], indexing="ij")
  return sum((g / r) ** 2 for g, r in zip(grids, radii_frac)) <= 1.0


def _write_nifti_study(folder: pathlib.Path, case_id: str, geometry: reader.Geometry, *,
                       num_phases: int = 3, seed: int = 0) -> np.ndarray:
  """Phases `<case_id>_0000.nii.gz`, ... of an enhancing ellipsoid; returns its mask."""
  rng = np.random.default_rng(seed)
  pre = df.smooth_volume(geometry.shape_zyx, rng)
  tumor = _ellipsoid(geometry.shape_zyx)
  folder.mkdir(parents=True, exist_ok=True)
  for p in range(num_phases):
    image = pre * (1.0 + (0.8 - 0.2 * p) * tumor * (p > 0))
    sitk.WriteImage(geometry.image(image.astype(np.float32)), str(folder / f"{case_id}_{p:04d}.nii.gz"))
  return tumor


# -- the real exam ---------------------------------------------------------------------------
def test_real_exam_mask_has_the_dce_geometry_and_a_valid_seg(nact_sample_dir, trained_workdir,
                                                             tmp_path, capsys):
  out = tmp_path / "out"
  results, skipped = predict.run(_flags(workdir=str(trained_workdir), input=str(nact_sample_dir),
                                        output=str(out), save_probabilities=True))
  assert not skipped and [r.name for r in results] == ["UCSF-BR-06"]
  mask_path, seg_path = out / "UCSF-BR-06.nii.gz", out / "UCSF-BR-06_seg.dcm"
  assert {p.name for p in out.iterdir()} == {
      "UCSF-BR-06.nii.gz", "UCSF-BR-06_seg.dcm", "UCSF-BR-06_prob.nii.gz", "volumes.csv"}

  # SimpleITK's own reading of the DCE series' first phase (the first 60 instances).
  scan = reader.scan_dicom(nact_sample_dir)
  dce = reader.classify_series(scan.series).dce
  assert len(dce) == 1
  phases = reader.split_phases(dce, "sample")
  series_reader = sitk.ImageSeriesReader()
  series_reader.SetFileNames([str(h.path) for h in phases[0].headers])
  reference = series_reader.Execute()
  mask = sitk.ReadImage(str(mask_path))
  _same_geometry(mask, reference)
  assert mask.GetPixelID() == sitk.sitkUInt8
  _same_geometry(sitk.ReadImage(str(out / "UCSF-BR-06_prob.nii.gz")), reference)
  voxels = int(sitk.GetArrayFromImage(mask).sum())
  cc = voxels * np.prod(reference.GetSpacing()) / 1000.0
  assert f"UCSF-BR-06: tumor volume {cc:.3f} cc ({voxels} voxels)" in capsys.readouterr().out
  assert (out / "volumes.csv").read_text().splitlines()[1].startswith(f"UCSF-BR-06,{voxels},")

  # The SEG reads back, references the DCE series (its post-contrast phase) and lies on it.
  seg = hd.seg.segread(seg_path)
  source = pydicom.dcmread(phases[1].headers[0].path, stop_before_pixels=True)
  assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
  referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
  assert referenced <= {pydicom.dcmread(h.path, stop_before_pixels=True).SOPInstanceUID
                        for h in phases[1].headers}
  assert seg.StudyInstanceUID == source.StudyInstanceUID
  assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
  # No patient identifiers from the headers: the study name stands in for them.
  assert str(seg.PatientName) == "UCSF-BR-06" and str(source.PatientName) != "UCSF-BR-06"
  for keyword in ("AccessionNumber", "PatientAge", "PatientSex", "StudyDate", "StudyID"):
    assert seg.get(keyword, "") == "", keyword


def test_seg_frames_land_on_their_slices(nact_sample_dir, tmp_path):
  """A known mask through the SEG writer reads back voxel for voxel on the DCE grid."""
  refs = predict.find_studies(nact_sample_dir)
  study = predict.load_study(refs[0])
  geometry = reader.Geometry.of(study.phases[0])
  mask = np.zeros(geometry.shape_zyx, np.uint8)
  mask[17:23, 100:140, 90:130] = 1                 # a box on six slices
  mask[40, 10:20, 200:210] = 1                     # and a lone slice
  prediction = predict.Prediction(mask.astype(np.float32), mask, geometry, [])
  result = predict.write_study(study, prediction, tmp_path, post_phase=1)
  seg_path = tmp_path / "UCSF-BR-06_seg.dcm"
  assert result.outputs == [tmp_path / "UCSF-BR-06.nii.gz", seg_path]
  np.testing.assert_array_equal(reader.read_seg(seg_path, study.phases[0], "UCSF-BR-06"), mask)
  seg = pydicom.dcmread(seg_path)
  assert int(seg.NumberOfFrames) == 7              # empty slices are left out
  normal_positions = sorted(float(np.dot(f.PlanePositionSequence[0].ImagePositionPatient,
                                         geometry.matrix[:, 2]))
                            for f in seg.PerFrameFunctionalGroupsSequence)
  headers = study.phase_headers[1]
  expected = sorted([headers[k].slice_position for k in (17, 18, 19, 20, 21, 22, 40)])
  np.testing.assert_allclose(normal_positions, expected, atol=1e-3)
  # For a PACS the user may keep the source's patient module.
  predict.write_study(study, prediction, tmp_path / "pacs", post_phase=1, copy_patient_module=True)
  source = pydicom.dcmread(headers[0].path, stop_before_pixels=True)
  kept = pydicom.dcmread(tmp_path / "pacs" / "UCSF-BR-06_seg.dcm", stop_before_pixels=True)
  assert kept.PatientName == source.PatientName and kept.StudyDate == source.StudyDate


def test_seg_references_the_post_phase_series_when_each_phase_is_a_series(tmp_path):
  grid = df.Grid()
  rng = np.random.default_rng(3)
  phases = np.stack([df.smooth_volume(grid.shape, rng) for _ in range(3)])
  df.write_dce(tmp_path / "in", df.Study(), grid, phases, layout="series_per_phase")
  study = predict.load_study(predict.find_studies(tmp_path / "in")[0])
  geometry = reader.Geometry.of(study.phases[0])
  mask = np.zeros(geometry.shape_zyx, np.uint8)
  mask[2:4, 3:8, 2:6] = 1
  prediction = predict.Prediction(mask.astype(np.float32), mask, geometry, [])
  for post_phase in (1, 2):
    predict.write_study(study, prediction, tmp_path / f"out{post_phase}", post_phase=post_phase)
    seg_path = tmp_path / f"out{post_phase}" / f"{study.name}_seg.dcm"
    seg = pydicom.dcmread(seg_path)
    post = pydicom.dcmread(study.phase_headers[post_phase][0].path, stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == post.SeriesInstanceUID
    np.testing.assert_array_equal(reader.read_seg(seg_path, study.phases[0], study.name), mask)
  empty = np.zeros_like(mask)          # no tumor found: still a valid SEG, every frame empty
  predict.write_study(study, predict.Prediction(empty.astype(np.float32), empty, geometry, []),
                      tmp_path / "none", post_phase=1)
  seg_path = tmp_path / "none" / f"{study.name}_seg.dcm"
  assert hd.seg.segread(seg_path).NumberOfFrames == geometry.shape_zyx[0]
  assert not reader.read_seg(seg_path, study.phases[0], study.name).any()


def test_batch_of_dicom_studies(trained_workdir, tmp_path, capsys):
  """Two exams below one folder: one output each, named by their folders, one line each."""
  for name, seed in (("visit_a", 0), ("visit_b", 1)):
    df.write_nact_exam(tmp_path / "in" / name, seed=seed)
  results, _ = predict.run(_flags(workdir=str(trained_workdir), input=str(tmp_path / "in"),
                                  output=str(tmp_path / "out"), folds="0"))
  assert [r.name for r in results] == ["visit_a", "visit_b"]
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "visit_a.nii.gz", "visit_a_seg.dcm", "visit_b.nii.gz", "visit_b_seg.dcm", "volumes.csv"]
  out = capsys.readouterr().out
  assert "visit_a: tumor volume" in out and "visit_b: tumor volume" in out
  assert "UCSF-BR-99" not in out                      # the headers' PatientID never shows


# -- NIfTI -----------------------------------------------------------------------------------
def test_oblique_nifti_keeps_its_geometry(trained_workdir, tmp_path):
  geometry = _oblique_geometry()
  _write_nifti_study(tmp_path / "in" / "images" / "CASE_007", "CASE_007", geometry)   # MAMA-MIA style
  out = tmp_path / "out"
  results, _ = predict.run(_flags(workdir=str(trained_workdir), input=str(tmp_path / "in"),
                                  output=str(out), save_probabilities=True, post_phase=2))
  assert [r.name for r in results] == ["CASE_007"]
  source = sitk.ReadImage(str(tmp_path / "in/images/CASE_007/CASE_007_0000.nii.gz"))
  for name in ("CASE_007.nii.gz", "CASE_007_prob.nii.gz"):
    _same_geometry(sitk.ReadImage(str(out / name)), source)
  assert not (out / "CASE_007_seg.dcm").exists()   # NIfTI in: no DICOM SEG


@pytest.mark.parametrize("grid_zyx", [(16, 48, 48), (12, 32, 32)])
def test_known_mask_survives_the_grid_both_ways(grid_zyx):
  """Mask -> model grid (as the builders store it) -> back (as predict maps it): Dice >= 0.98."""
  source = _oblique_geometry()
  truth = _ellipsoid(source.shape_zyx, (0.35, 0.3, 0.32)).astype(np.uint8)
  grid = reader.grid_geometry(source, grid_zyx)
  on_grid = reader.to_array(reader.resample(source.image(truth), grid, is_mask=True))
  probs, mask = predict.to_source(on_grid.astype(np.float32), grid, source, threshold=0.5)
  assert probs.shape == mask.shape == source.shape_zyx
  assert _dice(mask, truth) >= 0.98
  assert mask[0].sum() == truth[0].sum() == 0 or _dice(mask[0], truth[0]) > 0.9


def test_pre_post_files(trained_workdir, tmp_path):
  geometry = _oblique_geometry((30, 28, 9))
  _write_nifti_study(tmp_path, "scan", geometry, num_phases=2)
  out = tmp_path / "out"
  results, _ = predict.run(_flags(workdir=str(trained_workdir), pre=str(tmp_path / "scan_0000.nii.gz"),
                                  post=str(tmp_path / "scan_0001.nii.gz"), output=str(out),
                                  folds="1", largest_component=True))
  assert [r.name for r in results] == ["scan"]
  _same_geometry(sitk.ReadImage(str(out / "scan.nii.gz")), geometry.image(np.zeros(geometry.shape_zyx)))


# -- the ensemble ------------------------------------------------------------------------------
def test_fold_ensemble_is_the_mean_of_the_folds(trained_workdir, tmp_path):
  geometry = _oblique_geometry((32, 30, 10))
  _write_nifti_study(tmp_path, "ens", geometry)
  study = predict.load_study(predict.find_studies(tmp_path)[0])
  single = [predict.Predictor(trained_workdir, folds=str(k)).predict(study) for k in (0, 1)]
  both = predict.Predictor(trained_workdir, folds="all").predict(study)
  assert len(both.per_fold_grid) == 2
  for k in (0, 1):
    np.testing.assert_allclose(both.per_fold_grid[k], single[k].per_fold_grid[0], atol=1e-6)
  assert not np.allclose(single[0].per_fold_grid[0], single[1].per_fold_grid[0], atol=1e-4)
  predictor = predict.Predictor(trained_workdir, folds="0,1")
  _, _, grid = predictor.prepare(study)
  mean = (single[0].per_fold_grid[0].astype(np.float64) + single[1].per_fold_grid[0]) / 2
  probs, mask = predict.to_source(mean.astype(np.float32), grid, both.source, threshold=0.5)
  np.testing.assert_allclose(both.probabilities, probs, atol=1e-6)
  np.testing.assert_array_equal(both.mask, mask)


def test_same_preprocessing_as_training(trained_workdir, tiny_data, tmp_path):
  """A training record written out as NIfTI phases gets exactly the probabilities evaluation gives it."""
  config = predict.evaluate.trained_config(trained_workdir)
  config.data.data_dir = str(tiny_data)
  source, _ = input_pipeline.open_source(config.data)
  record = source[0]
  geometry = reader.Geometry.from_dict(record["source_geometry"])
  for p, phase in enumerate(record["image"]):
    sitk.WriteImage(geometry.image(phase), str(tmp_path / f"rec_{p:04d}.nii.gz"))
  predictor = predict.Predictor(trained_workdir, folds="0")
  prediction = predictor.predict(predict.load_study(predict.find_studies(tmp_path)[0]))
  case = input_pipeline.load_case(source, 0, config.data)
  expected = predictor.ensemble.evaluator.probabilities(predictor.ensemble.models[0].state, case)
  np.testing.assert_allclose(prediction.per_fold_grid[0], expected, atol=1e-5)
  np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-5)   # grid == source here


def test_constant_model_gives_a_constant_map_through_blending():
  """Where slabs overlap (and at the first and last slices) the weights sum to one."""
  volume = np.zeros((11, 4, 4, 3), np.float32)
  for blend in ("gaussian", "uniform"):
    logits = inference.sliding_slab_logits(volume, lambda s: np.full(s.shape[:4], 1.25), slab=4,
                                           step=3, blend=blend, batch_size=2)
    np.testing.assert_allclose(logits, 1.25, rtol=1e-6)


# -- bad input ---------------------------------------------------------------------------------
def test_single_phase_inputs_are_errors(tmp_path):
  geometry = _oblique_geometry((20, 20, 6))
  _write_nifti_study(tmp_path / "nii", "one", geometry, num_phases=1)
  with pytest.raises(predict.PredictError, match=r"one: a single phase \(one_0000.nii.gz\)"):
    predict.load_study(predict.find_studies(tmp_path / "nii")[0])
  grid = df.Grid()
  df.write_volume(tmp_path / "dcm", df.Study(), grid, df.smooth_volume(grid.shape, np.random.default_rng(0)),
                  folder="t1")
  with pytest.raises(predict.PredictError, match=r"t1: only single-phase MR series \(1\)"):
    predict.load_study(predict.find_studies(tmp_path / "dcm")[0])


def test_non_image_dicom_and_unreadable_files_are_errors(tmp_path):
  grid = df.Grid()
  study = df.Study()
  df.write_seg(tmp_path / "seg_only" / "seg.dcm", study, grid, np.ones(grid.shape, np.uint8))
  with pytest.raises(predict.PredictError, match="no MR image series .* non-image DICOM"):
    predict.load_study(predict.find_studies(tmp_path / "seg_only")[0])

  phases = np.stack([df.smooth_volume(grid.shape, np.random.default_rng(s)) for s in range(2)])
  paths = df.write_dce(tmp_path / "cut", study, grid, phases, layout="temporal_position")
  paths[3].write_bytes(paths[3].read_bytes()[:200])              # truncated mid-header
  ref, = predict.find_studies(tmp_path / "cut")
  with pytest.raises(predict.PredictError, match=f"{paths[3].name}.*(truncated|unreadable)"):
    predict.load_study(ref)

  bad = tmp_path / "nii" / "x_0001.nii.gz"
  _write_nifti_study(tmp_path / "nii", "x", _oblique_geometry((16, 16, 4)), num_phases=2)
  bad.write_bytes(b"not a nifti file")
  with pytest.raises(CaseError, match=r"x_0001.nii.gz: unreadable image file"):
    predict.load_study(predict.find_studies(tmp_path / "nii")[0])

  (tmp_path / "gap").mkdir()
  shutil.copy(tmp_path / "nii" / "x_0000.nii.gz", tmp_path / "gap" / "x_0000.nii.gz")
  shutil.copy(tmp_path / "nii" / "x_0000.nii.gz", tmp_path / "gap" / "x_0002.nii.gz")
  with pytest.raises(predict.PredictError, match=r"x: phase file\(s\) _0001 missing"):
    predict.load_study(predict.find_studies(tmp_path / "gap")[0])
  shutil.copy(tmp_path / "gap" / "x_0000.nii.gz", tmp_path / "gap" / "x_0001.nii")
  shutil.copy(tmp_path / "gap" / "x_0000.nii.gz", tmp_path / "gap" / "x_0001.nii.gz")
  with pytest.raises(predict.PredictError, match=r"x: phase 1 given twice \(x_0001.nii, x_0001.nii.gz\)"):
    predict.load_study(predict.find_studies(tmp_path / "gap")[0])
  (tmp_path / "empty").mkdir()
  with pytest.raises(predict.PredictError, match="no DICOM files and no NIfTI phase files"):
    predict.find_studies(tmp_path / "empty")
  with pytest.raises(predict.PredictError, match="--pre and --post go together"):
    predict.find_studies(pre=str(bad))


def test_skip_mode_goes_on_after_a_bad_study(trained_workdir, tmp_path):
  _write_nifti_study(tmp_path / "in", "good", _oblique_geometry((24, 24, 8)))
  _write_nifti_study(tmp_path / "in", "lone", _oblique_geometry((24, 24, 8)), num_phases=1)
  results, skipped = predict.run(_flags(workdir=str(trained_workdir), input=str(tmp_path / "in"),
                                        output=str(tmp_path / "out"), on_error="skip", folds="0"))
  assert [r.name for r in results] == ["good"] and [s[0] for s in skipped] == ["lone"]
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz", "volumes.csv"]


def test_workdir_problems_are_errors(trained_workdir, tmp_path):
  work = tmp_path / "untrained"
  work.mkdir()
  shutil.copy(trained_workdir / "config.json", work / "config.json")
  with pytest.raises(predict.evaluate.EvaluationError, match="no finished fold"):
    predict.Predictor(work)
  with pytest.raises(predict.PredictError, match=r"fold\(s\) \[4\] not finished \(finished: 0, 1\)"):
    predict.Predictor(trained_workdir, folds="4")


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "rst2g_jax.predict", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_bad_input_is_one_line(trained_workdir, tmp_path):
  _write_nifti_study(tmp_path / "in", "solo", _oblique_geometry((16, 16, 4)), num_phases=1)
  proc = _run_cli(f"--workdir={trained_workdir}", f"--input={tmp_path / 'in'}",
                  f"--output={tmp_path / 'out'}")
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: solo: a single phase (solo_0000.nii.gz)"), proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
  proc = _run_cli(f"--workdir={tmp_path / 'nowhere'}", f"--input={tmp_path / 'in'}",
                  f"--output={tmp_path / 'out'}")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'nowhere'}: no such work directory"), proc.stderr
