"""External evaluation of a trained work directory: each fold's best checkpoint and the ensemble.

A tiny RST2G is trained for 4 steps on both folds of the synthetic `tiny` collection,
then scored on a test-local "tiny external centre" (the synthetic builder's external
acquisition on the tiny 8x32x32 grid, 3 exams).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from rst2g_jax import checkpointing
from rst2g_jax import evaluate
from rst2g_jax import inference
from rst2g_jax import input_pipeline
from rst2g_jax import metrics as metrics_lib
from rst2g_jax import train
from rst2g_jax import train_state as ts
from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_external(monkeypatch, tmp_path_factory):
  """Registers `synthetic_dce/tiny_external` (test only) and returns its eval config."""
  from tfds_builders.synthetic_dce import synthetic_dce_dataset_builder as sdb
  cfg = sdb.SyntheticConfig(name="tiny_external", shape=(8, 32, 32), spacing=(2.0, 2.0, 2.0),
                            tumor_mm=(5.0, 10.0), num_cases=3, **sdb._EXTERNAL)  # pylint: disable=protected-access
  monkeypatch.setitem(sdb.Builder.builder_configs, "tiny_external", cfg)
  config = tiny_config.get_config()      # the eval settings; the model comes from the workdir
  config.data.builder_config = "tiny_external"
  config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds_external")
  return config


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "rst2g_jax.evaluate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_external_scores_every_case_per_fold_and_ensemble(trained_workdir, tiny_external):
  results = evaluate.evaluate_external(tiny_external, trained_workdir)
  out = trained_workdir / "external" / "synthetic_dce-tiny_external"
  for name in ("results.json", "results.md", "results.csv", "fold_0/summary.json",
               "fold_1/summary.json", "fold_0/test_metrics.json", "ensemble/summary.json"):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name

  stored = json.loads((out / "results.json").read_text())
  assert stored["folds_used"] == [0, 1] and [f["fold"] for f in stored["folds"]] == [0, 1]
  assert stored["num_test_cases"] == 3 and stored["collection"] == "synthetic_dce/tiny_external"
  for key in ("dsc", "ji", "rvd", "hd95", "assd"):
    assert set(stored["test"][key]) >= {"mean", "sd"}
    assert set(stored["test_by_case"][key]) >= {"mean", "sd"}
  # Each fold's record keeps the trained fold's selection (best step, validation DSC).
  for f in stored["folds"]:
    trained = json.loads((trained_workdir / f"fold_{f['fold']}/test_metrics.json").read_text())
    assert f["best_step"] == trained["best_step"] and f["val_dsc"] == trained["val_dsc"]
    assert 0.0 <= f["dsc"] <= 1.0
  source, cases = input_pipeline.open_source(tiny_external.data, tiny_external.data.data_dir)
  ids = [c["case_id"] for c in stored["ensemble"]["per_case"]]
  assert ids == [str(c["case_id"]) for c in cases] and len(ids) == 3   # every external case
  assert all(i.startswith("centre_b") for i in ids)
  for rows in [stored["ensemble"]["per_case"]] + [
      json.loads((out / f"fold_{k}/test_metrics.json").read_text())["per_case"] for k in (0, 1)]:
    assert [r["case_id"] for r in rows] == ids
    assert all(0.0 <= r["dsc"] <= 1.0 and 0.0 <= r["ji"] <= r["dsc"] + 1e-12 for r in rows)
  summary = json.loads((out / "fold_1/summary.json").read_text())
  assert [c["case_id"] for c in summary["metric_per_case"]] == ids
  case = summary["metric_per_case"][0]["metrics"]["1"]
  assert {"Dice", "IoU", "TP", "FP", "FN", "n_pred", "n_ref"} <= set(case)
  assert case["n_ref"] == case["TP"] + case["FN"]
  assert summary["mean"]["1"]["Dice"] == pytest.approx(
      np.mean([c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]]))
  md = (out / "results.md").read_text()
  assert "mean ± SD over folds (n=2)" in md and "## Fold ensemble" in md
  assert (out / "results.csv").read_text().splitlines()[-1].startswith("ensemble_over_cases,")
  assert results["ensemble"]["summary"]["dsc"]["mean"] == pytest.approx(
      stored["ensemble"]["summary"]["dsc"]["mean"])

  # The ensemble is the mean of the folds' probabilities: checked on one case against each
  # fold's best checkpoint restored and run independently of `evaluate`.
  case = input_pipeline.load_case(source, 0, tiny_external.data)
  mesh = ts.make_mesh(tiny_external.mesh)
  programs = train.make_programs(tiny_external, mesh)
  abstract = ts.abstract_state(jax.eval_shape(programs.init, 0), mesh)
  singles = []
  for fold in (0, 1):
    ckpt = checkpointing.FoldCheckpoints(trained_workdir / f"fold_{fold}" / "checkpoints")
    state, _ = ckpt.restore_best(abstract)
    ckpt.close()
    evaluator = train.Evaluator(programs.predict, mesh, tiny_external.eval, 4, [])
    singles.append(evaluator.probabilities(state, case))
  assert not np.allclose(singles[0], singles[1], atol=1e-4)   # two different models
  merged = evaluate.model_config(evaluate.trained_config(trained_workdir), tiny_external)
  members = evaluate.FoldEnsemble(merged, trained_workdir, [0, 1], mesh)
  per_fold, mean = members.probabilities(case)
  for got, want in zip(per_fold, singles):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mean, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
  # ... and results.json's ensemble row of that case is scored from that mean.
  pred = inference.segment(mean, threshold=0.5)
  want = metrics_lib.case_metrics(pred, case["mask"], case["spacing"])
  row = stored["ensemble"]["per_case"][0]
  assert row["case_id"] == case["case_id"]
  assert (row["tp"], row["fp"], row["fn"]) == (want["tp"], want["fp"], want["fn"])


def test_workdir_without_finished_fold_is_a_one_line_error(trained_workdir, tmp_path):
  work = tmp_path / "unfinished"
  (work / "fold_0" / "checkpoints").mkdir(parents=True)
  shutil.copy(trained_workdir / "config.json", work / "config.json")
  proc = _run_cli("--config=configs/synthetic_external.py", f"--workdir={work}")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "no finished fold with a best checkpoint" in lines[-1]
  assert str(work) in lines[-1]


def test_image_size_mismatch_is_a_one_line_error(trained_workdir, tmp_path):
  # configs/synthetic_external.py: 16x64x64 external grid; the workdir's model is 32x32.
  proc = _run_cli("--config=configs/synthetic_external.py", f"--workdir={trained_workdir}",
                  f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: synthetic_dce/external: slices of 64x64") and "(32, 32)" in last
  assert not (tmp_path / "tfds").exists()     # refused before building anything
  with pytest.raises(evaluate.EvaluationError, match="no finished fold"):
    evaluate.finished_folds(tmp_path)
