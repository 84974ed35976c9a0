"""Scores a trained work directory on an external collection (the paper's Table 3).

  python -m rst2g_jax.evaluate --config=configs/external.py --workdir=W

The model, its preprocessing (`data.slab`, `data.normalization`) and the weights come
from the TRAINED work directory W (`W/config.json`, each finished fold's best
checkpoint); the evaluation config names the external collection (`data.builder`,
`builder_config`, `manual_dir`, `data_dir`, `post_phase`), the whole-volume inference
settings (`eval`) and the mesh. Every external case is scored with each fold's model,
exactly as training scores its test cases, and with the fold ensemble (the mean of
the folds' probabilities, DESIGN.md §7a). Written to `W/external/<collection>/`:
`results.{json,md,csv}` (per-fold rows, mean ± SD over folds and over cases, and the
ensemble), `fold_<k>/{summary.json,test_metrics.json}` and `ensemble/summary.json`
(nnU-Net's schema).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from rst2g_jax import checkpointing
from rst2g_jax import cli_errors
from rst2g_jax import inference
from rst2g_jax import input_pipeline
from rst2g_jax import metrics as metrics_lib
from rst2g_jax import model as model_lib
from rst2g_jax import results as results_lib
from rst2g_jax import train
from rst2g_jax import train_state as ts


class EvaluationError(ValueError):
  """The work directory or the external collection cannot be evaluated; the message says why."""


# -- the trained work directory -----------------------------------------------------------
def trained_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config the work directory was trained with (`config.json`)."""
  path = workdir / "config.json"
  if not path.is_file():
    raise EvaluationError(f"{path}: not found; --workdir must be a work directory trained "
                          f"with `python -m rst2g_jax.main`")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (json.JSONDecodeError, TypeError) as e:
    raise EvaluationError(f"{path}: not a config written by training ({e})") from None


def finished_folds(workdir: pathlib.Path) -> list[int]:
  """Folds with `test_metrics.json` (training finished) and a best checkpoint."""
  folds = []
  for done in sorted(workdir.glob("fold_*/test_metrics.json")):
    fold_dir = done.parent
    best = fold_dir / "checkpoints" / "best"
    if fold_dir.name[5:].isdigit() and best.is_dir() and any(
        p.name.isdigit() for p in best.iterdir()):
      folds.append(int(fold_dir.name[5:]))
  if not folds:
    raise EvaluationError(
        f"{workdir}: no finished fold with a best checkpoint (fold_<k>/test_metrics.json and "
        f"fold_<k>/checkpoints/best/<step>); train it first with `python -m rst2g_jax.main`")
  return sorted(folds)


def model_config(trained: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The trained model and preprocessing with this run's inference and mesh settings."""
  merged = ml_collections.ConfigDict(trained.to_dict())
  merged.eval = ml_collections.ConfigDict(config.eval.to_dict())
  merged.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  merged.data = ml_collections.ConfigDict(config.data.to_dict())
  merged.data.slab = int(trained.data.slab)
  merged.data.normalization = str(trained.data.normalization)
  return merged


def collection_name(data_cfg) -> str:
  """The output folder's name, e.g. `zhang_external-default`."""
  return data_cfg.builder + (f"-{data_cfg.builder_config}" if data_cfg.builder_config else "")


def collection_grid(data_cfg) -> tuple[int, int, int]:
  """The (S, H, W) grid of the collection config `data_cfg` names (nothing built or read)."""
  from tfds_builders import build as build_lib  # pylint: disable=g-import-not-at-top
  try:
    cls = build_lib.builder_class(data_cfg.builder)
  except build_lib.BuildError as e:
    raise EvaluationError(str(e)) from None
  name = data_cfg.get("builder_config") or cls.BUILDER_CONFIGS[0].name
  if name not in cls.builder_configs:
    raise EvaluationError(f"{data_cfg.builder}: unknown config {name!r}; available: "
                          f"{', '.join(cls.builder_configs)}")
  return tuple(int(s) for s in cls.builder_configs[name].shape)


def check_grid(data_cfg, model_cfg) -> tuple[int, int, int]:
  """The collection's (S, H, W) grid; EvaluationError when (H, W) is not the model's."""
  grid = collection_grid(data_cfg)
  if grid[1:] != model_lib.image_size(model_cfg):
    raise EvaluationError(
        f"{train.dataset_name(data_cfg)}: slices of {grid[1]}x{grid[2]} but the trained model "
        f"expects model.image_size {model_lib.image_size(model_cfg)}; evaluate on a collection "
        f"config with that grid")
  return grid


# -- scoring ------------------------------------------------------------------------------
@dataclasses.dataclass
class FoldModel:
  fold: int
  state: ts.TrainState
  best_step: int
  record: dict      # the fold's test_metrics.json from training


class FoldEnsemble:
  """The best checkpoint of each finished fold, predicting whole volumes."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path,
               folds: Sequence[int], mesh: jax.sharding.Mesh):
    self.config = config
    programs = train.make_programs(config, mesh)
    self.graphs = programs.graphs
    abstract = ts.abstract_state(jax.eval_shape(programs.init, 0), mesh)
    self.models = []
    for fold in folds:
      fold_dir = workdir / f"fold_{fold}"
      ckpt = checkpointing.FoldCheckpoints(fold_dir / "checkpoints")
      try:
        state, meta = ckpt.restore_best(abstract)
      finally:
        ckpt.close()
      self.models.append(FoldModel(fold, state, int(meta["best_step"]),
                                   results_lib.read_json(fold_dir / "test_metrics.json")))
    self.evaluator = train.Evaluator(programs.predict, mesh, config.eval, int(config.data.slab), [])

  def probabilities(self, case: dict) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-fold probabilities [S, H, W] of one case, and the ensemble's (their mean)."""
    per_fold = [self.evaluator.probabilities(m.state, case) for m in self.models]
    return per_fold, ensemble_mean(per_fold)


def ensemble_mean(per_fold: Sequence[np.ndarray]) -> np.ndarray:
  """nnU-Net's fold ensemble: the voxel-wise mean of the folds' probabilities."""
  return np.mean(np.stack([np.asarray(p, np.float64) for p in per_fold]), axis=0).astype(np.float32)


def _case_row(case: dict, probs: np.ndarray, eval_cfg) -> dict:
  pred = inference.segment(probs, threshold=float(eval_cfg.threshold),
                           keep_largest=bool(eval_cfg.largest_component))
  return {"case_id": case["case_id"], **metrics_lib.case_metrics(pred, case["mask"], case["spacing"])}


# -- outputs -------------------------------------------------------------------------------
def _ensemble_markdown(ensemble: dict, folds: Sequence[int]) -> str:
  s = ensemble["summary"]
  cells = [results_lib.format_stat(s[k], k) for k in results_lib.TABLE_METRICS]
  head = results_lib.table_header()
  return (f"\n## Fold ensemble\n\nMean of the probabilities of folds {list(folds)}, mean ± SD over "
          f"cases:\n\n" + head + f"| ensemble (n={s['counts']['cases']} cases) | "
          + " | ".join(cells) + " |\n")


def write_outputs(out_dir: pathlib.Path, results: dict, *, title: str) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.md").write_text(
      results_lib.results_markdown(results, title=title)
      + _ensemble_markdown(results["ensemble"], results["folds_used"]))
  s = results["ensemble"]["summary"]
  row = ",".join(["ensemble_over_cases"] + [
      repr(float(s[k][stat])) for k in results_lib.TABLE_METRICS for stat in ("mean", "sd")])
  (out_dir / "results.csv").write_text(results_lib.results_csv(results) + row + "\n")
  results_lib.write_json(out_dir / "results.json", results)   # last: marks the run complete


def evaluate_external(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Scores every case of the external collection with each fold and their ensemble.

  Returns results.json's content: the training protocol's `aggregate` over the folds
  (on the external cases) plus "ensemble" ({"summary", "per_case"}), "folds_used",
  "collection" and "output_dir".
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir).absolute()
  trained = trained_config(workdir)
  folds = finished_folds(workdir)
  merged = model_config(trained, config)
  data_dir = pathlib.Path(config.data.data_dir or workdir / "tfds").absolute()
  check_grid(merged.data, merged.model)
  ts.maybe_initialize_distributed(merged.mesh)
  main_process = jax.process_index() == 0
  train.ensure_dataset(merged.data, data_dir)
  source, cases = input_pipeline.open_source(merged.data, str(data_dir))
  if not cases:
    raise EvaluationError(f"{train.dataset_name(merged.data)}: no cases in {data_dir}")
  mesh = ts.make_mesh(merged.mesh)
  ensemble = FoldEnsemble(merged, workdir, folds, mesh)
  name = collection_name(merged.data)
  if main_process:
    print(f"{train.dataset_name(merged.data)}: {len(cases)} external cases; folds {folds} of "
          f"{workdir}", flush=True)

  per_fold_rows: dict[int, list[dict]] = {f: [] for f in folds}
  ensemble_rows = []
  for index in tqdm(range(len(cases)), desc=f"external {name}", disable=not main_process):
    case = input_pipeline.load_case(source, index, merged.data)
    if case["image"].shape[1:3] != model_lib.image_size(merged.model):
      raise EvaluationError(f"{case['case_id']}: slices of {case['image'].shape[1:3]}, the model "
                            f"expects {model_lib.image_size(merged.model)}")
    per_fold, mean = ensemble.probabilities(case)
    for model, probs in zip(ensemble.models, per_fold):
      per_fold_rows[model.fold].append(_case_row(case, probs, merged.eval))
    ensemble_rows.append(_case_row(case, mean, merged.eval))

  out_dir = workdir / "external" / name
  records = []
  for model in ensemble.models:
    trained_record = model.record
    records.append(results_lib.fold_record(
        model.fold, per_fold_rows[model.fold], best_step=model.best_step,
        val_dsc=trained_record["val_dsc"],
        val_dsc_largest_component=trained_record["val_dsc_largest_component"],
        largest_component_applied=bool(merged.eval.largest_component),
        steps=trained_record["steps"], train_seconds=trained_record["train_seconds"]))
  results = results_lib.aggregate(records)
  results.update(
      ensemble={"summary": metrics_lib.summarize(ensemble_rows), "per_case": ensemble_rows},
      folds_used=list(folds), collection=train.dataset_name(merged.data),
      output_dir=str(out_dir))
  if main_process:
    for record in records:
      fold_dir = out_dir / f"fold_{record['fold']}"
      results_lib.write_json(fold_dir / "summary.json",
                             results_lib.nnunet_summary(record["per_case"]))
      results_lib.write_json(fold_dir / "test_metrics.json", record)
    results_lib.write_json(out_dir / "ensemble" / "summary.json",
                           results_lib.nnunet_summary(ensemble_rows))
    write_outputs(out_dir, results, title=f"{train.dataset_name(merged.data)} (external), "
                  f"{merged.model.name} trained in {workdir.name}")
    t, e = results["test"], results["ensemble"]["summary"]
    print(f"external over {len(folds)} fold(s): DSC {t['dsc']['mean']:.4f} ± {t['dsc']['sd']:.4f}; "
          f"ensemble DSC {e['dsc']['mean']:.4f} ± {e['dsc']['sd']:.4f} over {len(cases)} cases "
          f"-> {out_dir / 'results.md'}", flush=True)
  return results


# -- command line ----------------------------------------------------------------------------
# Flags live in this module's own FlagValues (as in `rst2g_jax.main`), so importing it clashes
# with no other command's flags.
FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
    "config", None, "Evaluation config (configs/external.py); override fields with "
    "--config.<section>.<field>=<value>.", flag_values=FLAGS, lock_config=True)
flags.DEFINE_string("workdir", None, "The trained work directory to evaluate.",
                    flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def run(f) -> dict:
  """The command, from parsed flags."""
  return evaluate_external(f.config, f.workdir)


def main(argv):
  del argv
  cli_errors.run_library("rst2g_jax.evaluate", FLAGS)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli_errors.parse_flags(FLAGS, argv, doc=__doc__))
