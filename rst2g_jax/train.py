"""The paper's protocol: patient-level splits, k-fold training, whole-volume test scoring.

`train_and_evaluate(config, workdir)` builds the dataset when it is missing,
writes `config.json` and `splits.json`, trains every requested fold (resuming
unfinished ones from their last checkpoint, skipping finished ones), picks each
fold's checkpoint by whole-volume validation DSC, scores it on the held-out test
patients and writes the tables and figures (see `results.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import signal
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rst2g_jax import checkpointing
from rst2g_jax import inference
from rst2g_jax import input_pipeline
from rst2g_jax import losses
from rst2g_jax import metrics as metrics_lib
from rst2g_jax import model as model_lib
from rst2g_jax import results as results_lib
from rst2g_jax import splits as splits_lib
from rst2g_jax import train_state as ts


class TrainingError(RuntimeError):
  """A fold that cannot go on (e.g. a non-finite loss); the message says which and why."""


class Interrupted(Exception):
  """SIGTERM/SIGINT arrived; the fold was saved before this was raised."""

  def __init__(self, signum: int, where: str):
    super().__init__(f"{signal.Signals(signum).name} received: {where}")
    self.signum = signum


# -- setup ---------------------------------------------------------------------------------
def dataset_name(data_cfg) -> str:
  return data_cfg.builder + (f"/{data_cfg.builder_config}" if data_cfg.builder_config else "")


def ensure_dataset(data_cfg, data_dir: pathlib.Path) -> None:
  """Builds the collection into `data_dir` unless it is already there.

  The synthetic collection builds by itself; manual collections read
  `data.manual_dir` and raise the builder's ManualDirError (one line saying where
  the data goes) when it is missing.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tfds_builders  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers builders)
  from tfds_builders import build as build_lib  # pylint: disable=g-import-not-at-top
  try:
    prepared = tfds.builder(dataset_name(data_cfg), data_dir=str(data_dir)).is_prepared()
  except Exception:  # unknown config etc.: let build() raise its own message
    prepared = False
  if prepared:
    return
  if jax.process_index() == 0:
    print(f"building {dataset_name(data_cfg)} into {data_dir}", flush=True)
    build_lib.build(data_cfg.builder, data_dir=str(data_dir),
                    manual_dir=data_cfg.manual_dir or None,
                    config=data_cfg.builder_config or None)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("dataset built")


def parse_folds(spec: str | int | Sequence[int], num_folds: int) -> list[int]:
  """"" -> all folds; "0,2" -> [0, 2]; checks the range."""
  if isinstance(spec, int):
    folds = [spec]
  elif isinstance(spec, str):
    folds = [int(s) for s in spec.replace(" ", "").split(",") if s] if spec.strip() else []
  else:
    folds = [int(s) for s in spec]
  folds = folds or list(range(num_folds))
  bad = [k for k in folds if not 0 <= k < num_folds]
  if bad:
    raise ValueError(f"cv.folds={spec!r}: folds {bad} outside 0..{num_folds - 1}")
  return sorted(set(folds))


def load_or_make_splits(path: pathlib.Path, cases: list[dict], cv_cfg, seed: int) -> dict:
  """The splits of this work directory: read back on reruns, made once otherwise."""
  if path.exists():
    splits = splits_lib.load_splits(path)
    known = {str(c["case_id"]) for c in cases}
    used = set(splits["test"]) | {c for f in splits["folds"] for c in f}
    if not used <= known or len(splits["folds"]) != int(cv_cfg.num_folds):
      raise splits_lib.SplitsError(
          f"{path}: made for another dataset or fold count; use a new --workdir")
    return splits
  splits = splits_lib.make_splits(cases, test_fraction=float(cv_cfg.test_fraction),
                                  num_folds=int(cv_cfg.num_folds), seed=seed)
  if jax.process_index() == 0:
    splits_lib.save_splits(path, splits)
  return splits


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


@contextlib.contextmanager
def stop_signals():
  """Turns SIGTERM/SIGINT into a flag the training loop polls (it then saves and stops)."""
  received: list[int] = []

  def handler(signum, frame):  # pylint: disable=unused-argument
    received.append(signum)

  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield received
  finally:
    for s, h in old.items():
      signal.signal(s, h)


# -- evaluation ----------------------------------------------------------------------------
def _to_host(x: jax.Array) -> np.ndarray:
  """The whole (global) array on every process; an intended device-to-host copy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with jax.transfer_guard("allow"):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Evaluator:
  """Whole-volume inference of a fixed set of cases with the current weights."""
  predict: Any
  mesh: jax.sharding.Mesh
  eval_cfg: ml_collections.ConfigDict
  slab: int
  cases: list[dict]

  def probabilities(self, state: ts.TrainState, case: dict) -> np.ndarray:
    sharding = ts.batch_sharding(self.mesh)
    data_size = self.mesh.shape[ts.DATA_AXIS]
    batch = int(self.eval_cfg.get("batch_size", 0) or data_size)
    batch = -(-batch // data_size) * data_size

    def predict_fn(slabs: np.ndarray) -> np.ndarray:
      # Every process holds the whole volume and uploads its devices' rows of it.
      with jax.transfer_guard_host_to_device("allow"):
        x = jax.make_array_from_callback(slabs.shape, sharding, lambda idx: slabs[idx])
      return _to_host(self.predict(state.params, state.model_state, x))

    logits = inference.sliding_slab_logits(
        case["image"], predict_fn, slab=self.slab, step=int(self.eval_cfg.slab_step),
        blend=str(self.eval_cfg.blend), batch_size=batch)
    return inference.sigmoid(logits)

  def dsc(self, state: ts.TrainState, *, desc: str = "validation") -> tuple[float, float]:
    """Mean DSC over the cases, without and with largest-component postprocessing."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    plain, lcc = [], []
    thr = float(self.eval_cfg.threshold)
    for case in tqdm(self.cases, desc=desc, leave=False, disable=jax.process_index() != 0):
      probs = self.probabilities(state, case)
      mask = inference.segment(probs, threshold=thr)
      plain.append(_dsc(mask, case["mask"]))
      lcc.append(_dsc(inference.largest_component(mask), case["mask"]))
    return float(np.mean(plain)), float(np.mean(lcc))


def _dsc(pred: np.ndarray, ref: np.ndarray) -> float:
  pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
  denom = pred.sum() + ref.sum()
  return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, ref).sum() / denom)


# -- one fold --------------------------------------------------------------------------------
@dataclasses.dataclass
class FoldContext:
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  source: Any
  cases: list[dict]
  splits: dict
  mesh: jax.sharding.Mesh
  programs: Programs | None = None


def _loss_fn(loss_cfg):
  def fn(logits, mask):
    return losses.rst2g_loss(logits, mask, bce_weight=float(loss_cfg.bce_weight),
                             boundary_weight=float(loss_cfg.boundary_weight),
                             dice_eps=float(loss_cfg.dice_eps))
  return fn


def _summary_writer(workdir: pathlib.Path, fold: int):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(str(workdir / "tensorboard" / f"fold_{fold}"))


@dataclasses.dataclass
class Programs:
  """Everything compiled for a run; the same for every fold, so compiled once."""
  graphs: ts.Graphs
  tx: Any
  init: Any
  step: Any        # jitted; any batch shape
  predict: Any
  _compiled: dict = dataclasses.field(default_factory=dict)

  def compiled_step(self, image_shape: tuple[int, ...], mesh) -> Any:
    """The step compiled ahead of time for one global batch shape; prints its memory use."""
    if image_shape not in self._compiled:
      sharding = ts.batch_sharding(mesh)
      state = jax.eval_shape(self.init, 0)
      state = ts.abstract_state(state, mesh)
      image = jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=sharding)
      mask = jax.ShapeDtypeStruct(image_shape[:-1], jnp.float32, sharding=sharding)
      compiled = self.step.lower(state, image, mask).compile()
      memory = compiled.memory_analysis()
      if memory is not None and jax.process_index() == 0:
        mib = lambda b: b / 2**20
        print(f"train step {image_shape}: arguments {mib(memory.argument_size_in_bytes):.1f} MiB, "
              f"temporaries {mib(memory.temp_size_in_bytes):.1f} MiB, outputs "
              f"{mib(memory.output_size_in_bytes):.1f} MiB ({mib(memory.alias_size_in_bytes):.1f} "
              f"MiB aliased to donated inputs) per device (XLA memory analysis)", flush=True)
      self._compiled[image_shape] = compiled
    return self._compiled[image_shape]


def make_programs(config, mesh) -> Programs:
  def build(rngs):
    return model_lib.build_model(config.model, dtype=compute_dtype(config.train.dtype),
                                 remat=bool(config.train.remat), rngs=rngs)

  tx = ts.make_optimizer(config.train)
  graphs, init = ts.make_init(build, tx, mesh)
  state = jax.eval_shape(init, 0)
  return Programs(
      graphs=graphs, tx=tx, init=init,
      step=ts.make_train_step(graphs.train, _loss_fn(config.loss), tx, mesh, state),
      predict=ts.make_predict_fn(graphs.eval, mesh, mirror_tta=bool(config.eval.mirror_tta)))


def train_fold(ctx: FoldContext, fold: int) -> dict:
  """Trains (or resumes) fold `fold`, selects its best checkpoint, scores the test set."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  config, mesh = ctx.config, ctx.mesh
  tcfg = config.train
  main_process = jax.process_index() == 0
  fold_dir = ctx.workdir / f"fold_{fold}"
  fold_dir.mkdir(parents=True, exist_ok=True)
  train_ids, val_ids = splits_lib.fold_cases(ctx.splits, fold)
  train_idx = input_pipeline.record_indices(ctx.cases, train_ids)
  val_idx = input_pipeline.record_indices(ctx.cases, val_ids)

  if ctx.programs is None:
    ctx.programs = make_programs(config, mesh)
  programs = ctx.programs
  state = programs.init(int(config.seed) + fold)
  num_steps = int(tcfg.num_steps)
  dataset = input_pipeline.train_dataset(
      ctx.source, train_idx, config.data, batch_size=int(tcfg.batch_size),
      seed=int(config.seed) * 1000 + fold, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  data_iter = iter(dataset)
  ckpt = checkpointing.FoldCheckpoints(fold_dir / "checkpoints", keep=int(tcfg.keep_checkpoints))
  meta = {"best_dsc": -1.0, "best_step": -1, "train_seconds": 0.0}
  metrics_path = fold_dir / "metrics.jsonl"
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore_last(ts.abstract_state(state, mesh), data_iter)
    if main_process:
      results_lib.truncate_jsonl(metrics_path, int(ckpt.latest_step()))
  elif main_process and metrics_path.exists():
    metrics_path.unlink()
  start = int(jax.device_get(state.step))

  h, w = config.model.image_size
  step_fn = programs.compiled_step(
      (int(tcfg.batch_size), int(config.data.slab), int(h), int(w), 3), mesh)
  predict = programs.predict
  val_cases = [input_pipeline.load_case(ctx.source, i, config.data) for i in val_idx]
  validator = Evaluator(predict, mesh, config.eval, int(config.data.slab), val_cases)
  # Each process uploads its own rows; the global batch is assembled from them.
  batches = input_pipeline.device_batches(data_iter, ts.batch_sharding(mesh))
  writer = _summary_writer(ctx.workdir, fold)
  lr_fn = ts.learning_rate_schedule(tcfg)

  def learning_rate(count):
    with jax.transfer_guard("allow"):  # optax schedules compute with jnp on scalars
      return float(lr_fn(count))

  def meta_now():
    return dict(meta, train_seconds=meta["train_seconds"] + (time.time() - t_start))

  def save_last(step):
    ckpt.save_last(step, state, data_iter, meta_now())

  def check(step, m):
    if not int(m["finite"]):
      ckpt.wait()
      ckpt.close()
      raise TrainingError(
          f"fold {fold}: non-finite loss or gradient at step {step} (loss={float(m['loss'])}); "
          f"stopped, the last good checkpoint (step {ckpt.latest_step()}) in "
          f"{fold_dir / 'checkpoints' / 'last'} is intact")

  t_start = time.time()
  window: list[dict] = []
  window_t0, window_start = time.time(), start
  pending = None  # (step, device metrics) fetched one step late so the host never blocks dispatch
  with stop_signals() as signals, jax.transfer_guard("disallow"), tqdm(
      total=num_steps, initial=start, desc=f"fold {fold}", disable=not main_process,
      dynamic_ncols=True) as bar:
    for step in range(start + 1, num_steps + 1):
      with jax.transfer_guard_host_to_device("allow"):  # the one intended upload per step
        batch = next(batches)
      state, device_metrics = step_fn(state, batch["image"], batch["mask"])
      if pending is not None:
        m = jax.device_get(pending[1])
        check(pending[0], m)
        window.append(m)
      pending = (step, device_metrics)
      bar.update(1)
      boundary = {
          "log": step % int(tcfg.log_every) == 0 or step == num_steps,
          "eval": step % int(tcfg.eval_every) == 0 or step == num_steps,
          "save": step % int(tcfg.checkpoint_every) == 0 or step == num_steps,
      }
      if any(boundary.values()) or signals:
        m = jax.device_get(pending[1])
        check(step, m)
        window.append(m)
        pending = None
      if boundary["log"] and window:
        elapsed = time.time() - window_t0
        record = {"step": step, **{k: float(np.mean([w[k] for w in window]))
                                   for k in ("loss", "dice", "bce", "boundary", "grad_norm")},
                  "lr": learning_rate(step - 1),
                  "slabs_per_s": (step - window_start) * int(tcfg.batch_size) / max(elapsed, 1e-9)}
        window, window_t0, window_start = [], time.time(), step
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if main_process:
          results_lib.append_jsonl(metrics_path, record)
          if writer:
            for k, v in record.items():
              if k != "step":
                writer.add_scalar(f"train/{k}", v, step)
      if boundary["eval"]:
        val_dsc, val_lcc = validator.dsc(state)
        improved = val_dsc > meta["best_dsc"]
        if improved:
          meta.update(best_dsc=val_dsc, best_step=step)
          ckpt.save_best(step, state, meta_now())
        if main_process:
          results_lib.append_jsonl(metrics_path, {"step": step, "val_dsc": val_dsc,
                                                  "val_dsc_largest_component": val_lcc})
          if writer:
            writer.add_scalar("val/dsc", val_dsc, step)
            writer.add_scalar("val/dsc_largest_component", val_lcc, step)
        if main_process:
          bar.write(f"fold {fold} step {step}: validation DSC {val_dsc:.4f}"
                    f"{' (best)' if improved else ''}")
      if boundary["save"] or signals:
        save_last(step)
      if signals:
        ckpt.wait()
        ckpt.close()
        raise Interrupted(signals[0], f"fold {fold} saved at step {step} in "
                          f"{fold_dir / 'checkpoints'}; rerun the same command to resume")
    if pending is not None:
      check(pending[0], jax.device_get(pending[1]))
  ckpt.wait()
  train_seconds = meta_now()["train_seconds"] if start < num_steps else meta["train_seconds"]

  # -- model selection and test ----------------------------------------------------------
  if ckpt.best_step() is None:
    raise TrainingError(f"fold {fold}: no validated checkpoint in {fold_dir / 'checkpoints'}")
  best_state, best_meta = ckpt.restore_best(ts.abstract_state(state, mesh))
  ckpt.close()
  val_dsc, val_lcc = validator.dsc(best_state, desc="validation (best)")
  keep_largest = bool(config.eval.largest_component)
  test_idx = input_pipeline.record_indices(ctx.cases, ctx.splits["test"])
  tester = Evaluator(predict, mesh, config.eval, int(config.data.slab), [])
  per_case = []
  preview_dir = ctx.workdir / "previews"
  preview_dir.mkdir(exist_ok=True)
  for n, index in enumerate(tqdm(test_idx, desc=f"fold {fold} test", leave=False,
                                 disable=not main_process)):
    case = input_pipeline.load_case(ctx.source, index, config.data)
    probs = tester.probabilities(best_state, case)
    pred = inference.segment(probs, threshold=float(config.eval.threshold),
                             keep_largest=keep_largest)
    per_case.append({"case_id": case["case_id"],
                     **metrics_lib.case_metrics(pred, case["mask"], case["spacing"])})
    if main_process and n < int(config.eval.get("num_previews", 2)):
      results_lib.save_preview(preview_dir / f"fold_{fold}_{case['case_id']}.png", case["image"],
                               case["mask"], pred, title=f"fold {fold} {case['case_id']}")
  record = results_lib.fold_record(
      fold, per_case, best_step=int(best_meta["best_step"]), val_dsc=val_dsc,
      val_dsc_largest_component=val_lcc, largest_component_applied=keep_largest,
      steps=num_steps, train_seconds=train_seconds)
  if main_process:
    results_lib.write_json(fold_dir / "summary.json", results_lib.nnunet_summary(per_case))
    results_lib.write_json(fold_dir / "test_metrics.json", record)  # last: marks the fold done
    if writer:
      writer.add_scalar("test/dsc", record["summary"]["dsc"]["mean"], num_steps)
      writer.close()
  return record


def fold_line(record: dict) -> str:
  s = record["summary"]
  return (f"fold {record['fold']}: best step {record['best_step']}, val DSC {record['val_dsc']:.4f}, "
          f"test DSC {s['dsc']['mean']:.4f} ± {s['dsc']['sd']:.4f}, JI {s['ji']['mean']:.4f}, "
          f"HD95 {s['hd95']['mean']:.2f} mm, ASSD {s['assd']['mean']:.2f} mm "
          f"({s['counts']['cases']} test cases, {record['train_seconds']:.0f} s training)")


# -- the protocol -----------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the cross-validation protocol in `workdir`; returns results.json's content."""
  workdir = pathlib.Path(workdir).absolute()
  ts.maybe_initialize_distributed(config.mesh)
  main_process = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = pathlib.Path(config.data.data_dir or workdir / "tfds").absolute()
  ensure_dataset(config.data, data_dir)
  source, cases = input_pipeline.open_source(config.data, str(data_dir))
  if main_process:
    results_lib.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
  splits = load_or_make_splits(workdir / "splits.json", cases, config.cv, int(config.seed))
  folds = parse_folds(config.cv.folds, int(config.cv.num_folds))
  mesh = ts.make_mesh(config.mesh)
  data_size = mesh.shape[ts.DATA_AXIS]
  if int(config.train.batch_size) % data_size:
    raise TrainingError(
        f"train.batch_size={config.train.batch_size} is not a multiple of the {data_size} devices "
        f"on the mesh's data axis; change --config.train.batch_size or --config.mesh.data")
  ctx = FoldContext(config, workdir, source, cases, splits, mesh)
  if main_process:
    print(f"{dataset_name(config.data)}: {len(cases)} cases, {len(splits['test'])} test; "
          f"folds {folds}; mesh {dict(mesh.shape)} on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)", flush=True)

  for fold in folds:
    done = workdir / f"fold_{fold}" / "test_metrics.json"
    if done.exists():
      if main_process:
        print(f"fold {fold}: finished earlier, results read back from {done}", flush=True)
      continue
    record = train_fold(ctx, fold)
    if main_process:
      print(fold_line(record), flush=True)

  # Tables over every finished fold in the work directory (a subset run includes earlier folds).
  records = [results_lib.read_json(p) for p in sorted(workdir.glob("fold_*/test_metrics.json"))]
  results = results_lib.aggregate(records)
  if main_process:
    results_lib.write_results(workdir, results, title=f"{dataset_name(config.data)}, "
                              f"{config.model.name}: test results")
    logs = {r["fold"]: results_lib.read_jsonl(workdir / f"fold_{r['fold']}" / "metrics.jsonl")
            for r in records}
    results_lib.plot_curves(workdir / "curves.png", logs)
    t = results["test"]
    print(f"test over {len(records)} fold(s): DSC {t['dsc']['mean']:.4f} ± {t['dsc']['sd']:.4f}, "
          f"JI {t['ji']['mean']:.4f}, RVD {t['rvd']['mean']:.3f}, HD95 {t['hd95']['mean']:.2f} mm, "
          f"ASSD {t['assd']['mean']:.2f} mm -> {workdir / 'results.md'}", flush=True)
  return results
