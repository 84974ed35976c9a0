"""`python -m rst2g_jax.interpret`: Grad-CAM overlays of studies read as `predict` reads them."""
import os
import pathlib
import subprocess
import sys
import types

import matplotlib.image
import numpy as np
import pytest

from rst2g_jax import gradcam
from rst2g_jax import interpret
from rst2g_jax import predict
from tests.test_predict import _oblique_geometry, _write_nifti_study


def _flags(**overrides):
  values = dict(workdir=None, input=None, pre=None, post=None, output=None, slices="auto",
                fold=None, post_phase=None, level=-1, modality="residual", target="tumor")
  values.update(overrides)
  return types.SimpleNamespace(**values)


def test_grid_slice_maps_centres_of_the_same_box():
  assert [interpret.grid_slice(k, 8, 8) for k in range(8)] == list(range(8))
  assert [interpret.grid_slice(k, 12, 8) for k in range(12)] == [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7]
  assert [interpret.grid_slice(k, 4, 8) for k in range(4)] == [1, 3, 5, 7]
  assert interpret.parse_slices("auto") is None and interpret.parse_slices("3, 5") == [3, 5]
  with pytest.raises(predict.PredictError, match="--slices='a'"):
    interpret.parse_slices("a")


def test_overlays_of_chosen_slices_match_the_library(trained_workdir, tmp_path):
  geometry = _oblique_geometry((40, 36, 12))
  _write_nifti_study(tmp_path / "in", "obl", geometry)
  paths = interpret.run(_flags(workdir=str(trained_workdir), input=str(tmp_path / "in"),
                               output=str(tmp_path / "out"), slices="2,9", fold=1))
  assert [p.name for p in paths] == ["obl_slice2_gradcam.png", "obl_slice9_gradcam.png"]
  image = matplotlib.image.imread(paths[0])
  assert image.shape[:2] == (256, 256)            # the 32 x 32 model grid, scaled by 8
  assert image[..., :3].std() > 0.05              # not a blank picture

  # The picture's map is the library's map of the study's model-grid slice.
  predictor = predict.Predictor(trained_workdir, folds="1")
  study = predict.load_study(predict.find_studies(tmp_path / "in")[0])
  volume, _, _ = predictor.prepare(study)
  g = interpret.grid_slice(9, 12, 8)
  model = predictor.ensemble.models[0]
  cams = gradcam.volume_cams(predictor.ensemble.graphs.eval, model.state.params,
                             model.state.model_state, volume, [g], 4)
  assert cams[g].shape == (32, 32) and 0.0 <= cams[g].min() and cams[g].max() <= 1.0
  image = matplotlib.image.imread(paths[1])       # slice 9
  jet_red = image[..., 0] - image[..., 2]          # where the map is high the overlay is red
  upsampled = np.kron(cams[g], np.ones((8, 8)))
  assert np.corrcoef(jet_red.ravel(), upsampled.ravel())[0, 1] > 0.5


def test_auto_slice_and_bad_slices(trained_workdir, tmp_path):
  _write_nifti_study(tmp_path / "in", "a", _oblique_geometry((24, 24, 6)))
  paths = interpret.run(_flags(workdir=str(trained_workdir), input=str(tmp_path / "in"),
                               output=str(tmp_path / "out")))
  assert len(paths) == 1 and paths[0].name.startswith("a_slice") and paths[0].is_file()
  with pytest.raises(predict.PredictError, match=r"a: slice\(s\) \[6\] outside its 6 slices"):
    interpret.run(_flags(workdir=str(trained_workdir), input=str(tmp_path / "in"),
                         output=str(tmp_path / "out2"), slices="1,6"))


def test_cli_writes_overlays_and_bad_slices_are_one_line(trained_workdir, tmp_path):
  _write_nifti_study(tmp_path / "in", "c", _oblique_geometry((24, 24, 6)))
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
  run = lambda *a: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "rst2g_jax.interpret", f"--workdir={trained_workdir}",
       f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}", *a], cwd=root, env=env,
      capture_output=True, text=True, timeout=120)
  proc = run("--slices=x")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      "error: --slices='x'; expected 'auto' or slice numbers like 20,30"), proc.stderr
  proc = run("--slices=3", "--fold=0")
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "out" / "c_slice3_gradcam.png").is_file()
  assert proc.stdout.strip().endswith("c_slice3_gradcam.png")
