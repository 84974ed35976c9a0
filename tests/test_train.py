"""The training protocol end to end on the synthetic `tiny` collection, and its parts.

Compiled programs are shared through JAX's persistent compilation cache (one
folder for the session) so that the several runs below compile the tiny model once.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rst2g_jax import checkpointing
from rst2g_jax import splits as splits_lib
from rst2g_jax import input_pipeline
from rst2g_jax import train
from rst2g_jax import train_state as ts
from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir, **train_overrides):
  config = tiny_config.get_config()
  config.data.data_dir = str(data_dir)
  for k, v in train_overrides.items():
    setattr(config.train, k, v)
  return config


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# -- optimizer -----------------------------------------------------------------------------
def test_optimizer_is_torch_adam_with_coupled_weight_decay():
  torch = pytest.importorskip("torch")
  cfg = ml_collections.ConfigDict(dict(learning_rate=1e-2, weight_decay=0.1, schedule="constant",
                                       warmup_steps=0, grad_clip_norm=0.0, num_steps=5))
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  grads = rng.normal(size=(4, 5)).astype(np.float32)
  tx = ts.make_optimizer(cfg)
  w, opt = jnp.asarray(w0), tx.init(jnp.asarray(w0))
  p = torch.nn.Parameter(torch.tensor(w0))
  topt = torch.optim.Adam([p], lr=1e-2, weight_decay=0.1)
  for g in grads:
    updates, opt = tx.update(jnp.asarray(g), opt, w)
    w = optax.apply_updates(w, updates)
    p.grad = torch.tensor(g)
    topt.step()
  np.testing.assert_allclose(np.asarray(w), p.detach().numpy(), rtol=1e-5, atol=1e-6)
  # AdamW (decoupled) would differ: the check above can fail.
  adamw = optax.adamw(1e-2, weight_decay=0.1)
  w2, o2 = jnp.asarray(w0), adamw.init(jnp.asarray(w0))
  for g in grads:
    u, o2 = adamw.update(jnp.asarray(g), o2, w2)
    w2 = optax.apply_updates(w2, u)
  assert not np.allclose(np.asarray(w2), np.asarray(w), atol=1e-4)


def test_schedules_and_clipping():
  base = dict(learning_rate=1e-3, weight_decay=0.0, warmup_steps=10, grad_clip_norm=0.0,
              num_steps=110)
  cos = ts.learning_rate_schedule(ml_collections.ConfigDict(dict(base, schedule="cosine")))
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1e-3)
  assert float(cos(110)) == pytest.approx(0.0, abs=1e-9)
  const = ts.learning_rate_schedule(ml_collections.ConfigDict(dict(base, schedule="constant")))
  assert float(const(5)) == pytest.approx(5e-4) and float(const(50)) == pytest.approx(1e-3)
  clip = ts.make_optimizer(ml_collections.ConfigDict(dict(base, schedule="constant", warmup_steps=0,
                                                          grad_clip_norm=1.0)))
  g = {"w": jnp.full((4,), 100.0)}
  u, _ = clip.update(g, clip.init(g), g)
  # Adam's first step is lr * sign(g) whatever the scale; clipping shows in its state.
  assert float(jnp.abs(u["w"]).max()) == pytest.approx(1e-3, rel=1e-3)
  with pytest.raises(ValueError, match="schedule"):
    ts.learning_rate_schedule(ml_collections.ConfigDict(dict(base, schedule="step")))


def test_parse_folds():
  assert train.parse_folds("", 5) == [0, 1, 2, 3, 4]
  assert train.parse_folds("2,0", 5) == [0, 2]
  with pytest.raises(ValueError, match="outside"):
    train.parse_folds("5", 5)


def test_results_aggregate_over_folds_and_over_cases():
  from rst2g_jax import metrics as metrics_lib
  from rst2g_jax import results
  ref = np.zeros((4, 8, 8), bool)
  ref[1:3, 2:6, 2:6] = True
  pred_good, pred_half = ref.copy(), ref.copy()
  pred_half[1] = False
  def case(cid, pred):
    return {"case_id": cid, **metrics_lib.case_metrics(pred, ref, (2.0, 1.0, 1.0))}
  fold0 = results.fold_record(0, [case("a", pred_good), case("b", pred_half)], best_step=5,
                              val_dsc=0.5, val_dsc_largest_component=0.6,
                              largest_component_applied=False, steps=10, train_seconds=1.0)
  fold1 = results.fold_record(1, [case("a", pred_half), case("b", pred_half)], best_step=7,
                              val_dsc=0.4, val_dsc_largest_component=0.3,
                              largest_component_applied=False, steps=10, train_seconds=1.0)
  half = 2 * 16 / (32 + 16)
  agg = results.aggregate([fold1, fold0])
  fold_means = [(1 + half) / 2, half]
  assert agg["test"]["dsc"]["mean"] == pytest.approx(np.mean(fold_means))
  assert agg["test"]["dsc"]["sd"] == pytest.approx(np.std(fold_means, ddof=1))
  case_means = [(1 + half) / 2, half]          # case a: folds 1 and half; case b: half twice
  assert agg["test_by_case"]["dsc"]["sd"] == pytest.approx(np.std(case_means, ddof=1))
  assert [f["fold"] for f in agg["folds"]] == [0, 1]
  assert agg["folds"][0]["largest_component_improves_val"] is True
  assert agg["folds"][1]["largest_component_improves_val"] is False
  md = results.results_markdown(agg)
  assert f"{100 * np.mean(fold_means):.1f} ± {100 * np.std(fold_means, ddof=1):.1f}" in md
  assert "improves validation DSC in 1 of 2 folds" in md
  summary = results.nnunet_summary(fold0["per_case"])
  assert summary["mean"]["1"]["Dice"] == pytest.approx((1 + half) / 2)


# -- parallelism ---------------------------------------------------------------------------
# Tolerance of the parallel-vs-one-device comparisons: float32 reductions are split
# differently across devices (BatchNorm statistics and gradients are all-reduced), so
# losses and statistics agree to ~1e-6 relative; Adam turns a gradient that is ~0
# (a conv bias right before BatchNorm) into +-lr*sign noise, so single parameters may
# differ by up to 3 steps x 2 x lr while the median difference stays below 1e-4.
def _assert_same_training(params, loss, ref_params, ref_loss):
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  diffs = [float(np.max(np.abs(params[k] - ref_params[k]))) for k in ref_params]
  assert len(params) == len(ref_params)
  assert max(diffs) <= 3 * 2 * 1e-3 + 1e-6 and np.median(diffs) < 1e-4


@pytest.fixture(scope="session")
def one_device_run(compile_cache):
  from tests import multihost_worker
  state, metrics = multihost_worker.three_steps(1)
  return jax.device_get(state), multihost_worker.flat_params(state), float(metrics["loss"])


def test_eight_device_step_equals_one_device(one_device_run):
  """3 steps of the tiny U-Net, global batch of 8 slabs: mesh of 8 == mesh of 1."""
  from tests import multihost_worker
  ref_state, ref_params, ref_loss = one_device_run
  state, metrics = multihost_worker.three_steps(8)
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  _assert_same_training(multihost_worker.flat_params(state), metrics["loss"], ref_params, ref_loss)
  # BatchNorm running statistics are those of the global batch on both meshes.
  for a, b in zip(jax.tree.leaves(jax.device_get(state.model_state)),
                  jax.tree.leaves(ref_state.model_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _worker_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  env.update(extra)
  return env


def test_two_processes_match_one(tmp_path, compile_cache, one_device_run):
  """jax.distributed on loopback, 2 processes x 2 CPU devices, each feeding half the batch."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_worker", str(tmp_path / "multi.npz")], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_worker_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(i), JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")) for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  multi = np.load(tmp_path / "multi.npz")
  assert int(multi["processes"]) == 2 and int(multi["devices"]) == 4
  _, ref_params, ref_loss = one_device_run
  _assert_same_training({k: multi[k] for k in ref_params}, multi["loss"], ref_params, ref_loss)


# -- the protocol --------------------------------------------------------------------------
def test_one_fold_end_to_end_writes_every_file(tiny_data, compile_cache, tmp_path, capsys):
  config = _config(tiny_data)
  work = tmp_path / "w"
  results = train.train_and_evaluate(config, work)
  for name in ("config.json", "splits.json", "results.json", "results.md", "results.csv",
               "curves.png", "fold_0/summary.json", "fold_0/metrics.jsonl",
               "fold_0/test_metrics.json"):
    assert (work / name).is_file() and (work / name).stat().st_size > 0, name
  assert list((work / "previews").glob("fold_0_*.png"))
  assert list((work / "tensorboard" / "fold_0").glob("events.out.tfevents.*"))
  assert (work / "fold_0" / "checkpoints" / "best").is_dir()
  assert sorted(int(p.name) for p in (work / "fold_0/checkpoints/last").iterdir()
                if p.name.isdigit()) == [2, 4]

  stored = json.loads((work / "results.json").read_text())
  splits = splits_lib.load_splits(work / "splits.json")
  for key in ("dsc", "ji", "rvd", "hd95", "assd"):
    assert set(stored["test"][key]) >= {"mean", "sd"}
  assert 0.0 <= stored["test"]["dsc"]["mean"] <= 1.0 and 0.0 <= stored["test"]["ji"]["mean"] <= 1.0
  assert stored["test"]["ji"]["mean"] <= stored["test"]["dsc"]["mean"] + 1e-12
  assert [f["fold"] for f in stored["folds"]] == [0]
  assert stored["num_test_cases"] == len(splits["test"])
  assert results["test"]["dsc"]["mean"] == stored["test"]["dsc"]["mean"]

  summary = json.loads((work / "fold_0/summary.json").read_text())
  assert [c["case_id"] for c in summary["metric_per_case"]] == splits["test"]
  case = summary["metric_per_case"][0]["metrics"]["1"]
  assert {"Dice", "IoU", "TP", "FP", "FN", "n_pred", "n_ref"} <= set(case)
  assert case["n_ref"] == case["TP"] + case["FN"] and case["n_pred"] == case["TP"] + case["FP"]
  dices = [c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]]
  assert summary["mean"]["1"]["Dice"] == pytest.approx(np.mean(dices))
  assert summary["foreground_mean"]["Dice"] == summary["mean"]["1"]["Dice"]

  log = [json.loads(l) for l in (work / "fold_0/metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in log if "loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train_rows)
  assert [r["step"] for r in log if "val_dsc" in r] == [2, 4]
  fold = json.loads((work / "fold_0/test_metrics.json").read_text())
  assert fold["best_step"] in (2, 4) and 0 <= fold["val_dsc"] <= 1
  md = (work / "results.md").read_text()
  assert "DSC/%" in md and "both empty" in md
  assert (work / "results.csv").read_text().startswith("row,dsc_mean,dsc_sd")
  out = capsys.readouterr().out
  assert "fold 0: best step" in out

  # A rerun skips the finished fold and reads its results back.
  again = train.train_and_evaluate(config, work)
  assert "fold 0: finished earlier" in capsys.readouterr().out
  assert again["test"] == results["test"] or json.dumps(again["test"]) == json.dumps(results["test"])


def _fold_context(config, work):
  data_dir = pathlib.Path(config.data.data_dir)
  source, cases = input_pipeline.open_source(config.data, str(data_dir))
  splits = train.load_or_make_splits(work / "splits.json", cases, config.cv, 0)
  return train.FoldContext(config, work, source, cases, splits, ts.make_mesh(config.mesh))


def _last_state(ctx, work, step):
  ck = checkpointing.FoldCheckpoints(work / "fold_0" / "checkpoints")
  abstract = jax.eval_shape(ctx.programs.init, 0)
  abstract = ts.abstract_state(abstract, ctx.mesh)
  state, _ = ck.restore_last(abstract, step=step)
  ck.close()
  return state


def _start_main(work, data_dir, cache):
  env = _worker_env(JAX_COMPILATION_CACHE_DIR=str(cache),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen(
      [sys.executable, "-m", "rst2g_jax.main", "--config=tests/tiny_config.py", f"--workdir={work}",
       f"--config.data.data_dir={data_dir}", "--config.train.num_steps=100000",
       "--config.train.log_every=1", "--config.train.checkpoint_every=1",
       "--config.train.eval_every=100000"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, work, step, timeout=240):
  import time
  log = work / "fold_0" / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    rows = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    if rows and rows[-1]["step"] >= step:
      return rows[-1]["step"]
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"no step {step} within {timeout} s")


def test_sigkill_then_sigterm_then_resume_is_bit_exact(tiny_data, compile_cache, tmp_path,
                                                       monkeypatch):
  import signal
  work = tmp_path / "interrupted"
  ckpt_dir = work / "fold_0" / "checkpoints"
  proc = _start_main(work, tiny_data, compile_cache)
  _wait_for_step(proc, work, 3)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  ck = checkpointing.FoldCheckpoints(ckpt_dir)
  killed_at = ck.latest_step()
  ck.close()
  assert killed_at is not None and killed_at >= 1  # async saves of later steps may be lost

  # Restarted: resumes from the checkpoint; SIGTERM then saves and exits 143 with one line.
  logged = max(json.loads(l)["step"] for l in (work / "fold_0/metrics.jsonl").read_text().splitlines())
  proc = _start_main(work, tiny_data, compile_cache)
  _wait_for_step(proc, work, logged + 2)   # past what the killed run logged: resumed and running
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("stopped: SIGTERM received: fold 0 saved at step ")
  stopped_at = int(last.split("saved at step ")[1].split()[0])
  ck = checkpointing.FoldCheckpoints(ckpt_dir)
  assert ck.latest_step() == stopped_at > killed_at
  ck.close()
  steps = [json.loads(l)["step"] for l in (work / "fold_0/metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps))  # no duplicate rows after the resume

  # Resume in this process to stopped_at + 2; compare with an uninterrupted run.
  final_step = stopped_at + 2
  config = _config(tiny_data, num_steps=final_step, log_every=1, checkpoint_every=1,
                   eval_every=100000)
  ctx = _fold_context(config, work)
  ctx.programs = train.make_programs(config, ctx.mesh)
  before = _last_state(ctx, work, stopped_at)
  train.train_fold(ctx, 0)
  straight = tmp_path / "straight"
  ref_ctx = _fold_context(config, straight)
  ref_ctx.programs = ctx.programs
  train.train_fold(ref_ctx, 0)
  final = _last_state(ctx, work, final_step)
  assert int(final.step) == final_step
  assert _leaves_equal(final, _last_state(ctx, straight, final_step))
  assert not _leaves_equal(before.params, final.params)

  # A NaN loss after that checkpoint stops the fold and leaves the checkpoint intact.
  config.train.num_steps = final_step + 3
  real_loss = train._loss_fn

  def nan_loss(loss_cfg):
    fn = real_loss(loss_cfg)
    return lambda logits, mask: jax.tree.map(lambda v: v * jnp.nan, fn(logits, mask))

  monkeypatch.setattr(train, "_loss_fn", nan_loss)
  with pytest.raises(train.TrainingError,
                     match=rf"non-finite loss .* step {final_step + 1}.*last good checkpoint "
                           rf"\(step {final_step}\)"):
    train.train_fold(_fold_context(config, work), 0)
  ck = checkpointing.FoldCheckpoints(ckpt_dir)
  assert ck.latest_step() == final_step
  ck.close()
  assert _leaves_equal(_last_state(ctx, work, final_step), final)


def test_batch_not_divisible_by_devices_is_a_one_line_error(tiny_data, tmp_path):
  config = _config(tiny_data, batch_size=3)
  config.mesh.data = 2
  with pytest.raises(train.TrainingError, match="not a multiple of the 2 devices"):
    train.train_and_evaluate(config, tmp_path / "w")


def test_nact_without_data_exits_with_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-m", "rst2g_jax.main", "--config=configs/nact.py",
       f"--workdir={tmp_path / 'w'}", f"--config.data.manual_dir={tmp_path / 'nothing'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "manual_dir" in last and "Breast-MRI-NACT-Pilot" in last

