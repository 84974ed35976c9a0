"""Grad-CAM overlays of the convolutional encoder for chosen slices (paper Fig. 8).

  python -m rst2g_jax.interpret --workdir=W --input=PATH --slices=20,30 --output=DIR
      [--fold=k] [--level=-1] [--modality=residual|pre|post|sum] [--target=tumor|all]

Studies are read and preprocessed exactly as `rst2g_jax.predict` does (same `--input` /
`--pre --post` forms); `--slices` counts slices of the input (0-based, along its third
axis) and `auto` picks the slice with the largest predicted tumor. For each slice,
`DIR/<study>_slice<k>_gradcam.png` shows the normalised post-contrast slice on the
model's grid, the map of one fold's model (`rst2g_jax.gradcam`) and the predicted
tumor's contour.
"""
from __future__ import annotations

import pathlib

from absl import app
from absl import flags
import numpy as np

from rst2g_jax import cli_errors
from rst2g_jax import evaluate
from rst2g_jax import gradcam
from rst2g_jax import predict as predict_lib


def grid_slice(k: int, source_slices: int, grid_slices: int) -> int:
  """The model-grid slice whose centre is nearest to the input's slice `k` (same physical box)."""
  return min(int((k + 0.5) * grid_slices / source_slices), grid_slices - 1)


def parse_slices(spec: str) -> list[int] | None:
  """`auto` -> None, else the comma-separated slice numbers."""
  if str(spec).strip().lower() == "auto":
    return None
  try:
    slices = [int(s) for s in str(spec).split(",") if s.strip()]
  except ValueError:
    raise predict_lib.PredictError(f"--slices={spec!r}; expected 'auto' or slice numbers like 20,30") from None
  if not slices:
    raise predict_lib.PredictError("--slices is empty; expected 'auto' or slice numbers like 20,30")
  return slices


def interpret_study(predictor: predict_lib.Predictor, study: predict_lib.Study,
                    slices: list[int] | None, out_dir: pathlib.Path, *, level: int = -1,
                    modality: str | None = None, target: str = "tumor") -> list[pathlib.Path]:
  """Writes one overlay PNG per slice of `study`; returns their paths."""
  volume, source, grid = predictor.prepare(study)
  prediction = predictor.predict_prepared(study.name, volume, source, grid)
  source_slices, grid_slices = source.shape_zyx[0], grid.shape_zyx[0]
  if slices is None:
    slices = [int(np.argmax(prediction.mask.reshape(source_slices, -1).sum(axis=1)))
              if prediction.mask.any() else source_slices // 2]
  bad = [k for k in slices if not 0 <= k < source_slices]
  if bad:
    raise predict_lib.PredictError(f"{study.name}: slice(s) {bad} outside its {source_slices} slices")
  on_grid = {k: grid_slice(k, source_slices, grid_slices) for k in slices}
  model = predictor.ensemble.models[0]
  try:
    cams = gradcam.volume_cams(predictor.ensemble.graphs.eval, model.state.params,
                               model.state.model_state, volume, sorted(set(on_grid.values())),
                               int(predictor.config.data.slab), level=level, modality=modality,
                               target=target)
  except ValueError as e:
    raise predict_lib.PredictError(f"{study.name}: {e}") from None
  tumor = prediction.per_fold_grid[0] > float(predictor.config.eval.threshold)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for k, g in on_grid.items():
    path = out_dir / f"{study.name}_slice{k}_gradcam.png"
    gradcam.overlay_png(volume[g, ..., 1], cams[g], str(path), mask=tumor[g],
                        title=f"{study.name} slice {k} (fold {model.fold})")
    paths.append(path)
  return paths


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A work directory trained with `python -m rst2g_jax.main`.",
                    flag_values=FLAGS)
flags.DEFINE_string("input", None, "A DICOM study folder, a folder of NIfTI phase files, or a "
                    "folder of many studies (as for rst2g_jax.predict).", flag_values=FLAGS)
flags.DEFINE_string("pre", None, "Pre-contrast image file (with --post).", flag_values=FLAGS)
flags.DEFINE_string("post", None, "Post-contrast image file (with --pre).", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Output folder for the PNGs.", flag_values=FLAGS)
flags.DEFINE_string("slices", "auto", "Slices of the input (0-based), comma-separated, or 'auto' "
                    "(the slice with the largest predicted tumor).", flag_values=FLAGS)
flags.DEFINE_integer("fold", None, "The fold whose model is explained (default: the first "
                     "finished fold).", flag_values=FLAGS)
flags.DEFINE_integer("post_phase", None, "Post-contrast phase (default: the trained config's).",
                     flag_values=FLAGS)
flags.DEFINE_integer("level", -1, "Encoder CNN stage: 0 = stem, 1.. = DownBlocks, -1 = deepest.",
                     flag_values=FLAGS)
flags.DEFINE_enum("modality", "residual", ["residual", "pre", "post", "sum"], "Whose encoder "
                  "stream the map shows (the encoder is shared by the three inputs).",
                  flag_values=FLAGS)
flags.DEFINE_enum("target", "tumor", list(gradcam.TARGETS), "Score: the logits of the predicted "
                  "tumor voxels, or of all voxels.", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "output"], flag_values=FLAGS)


def run(f) -> list[pathlib.Path]:
  """The command, from parsed flags."""
  refs = predict_lib.find_studies(f.input, pre=f.pre, post=f.post)
  slices = parse_slices(f.slices)
  fold = f.fold
  if fold is None and pathlib.Path(f.workdir).is_dir():
    fold = evaluate.finished_folds(pathlib.Path(f.workdir).absolute())[0]
  predictor = predict_lib.Predictor(f.workdir, folds="all" if fold is None else str(fold),
                                    post_phase=1 if f.pre else f.post_phase)
  modality = None if predictor.config.model.name == "unet" else f.modality
  paths = []
  for ref in refs:
    study = predict_lib.load_study(ref)
    written = interpret_study(predictor, study, slices, pathlib.Path(f.output), level=f.level,
                              modality=modality, target=f.target)
    for path in written:
      print(f"{study.name}: {path}", flush=True)
    paths.extend(written)
  return paths


def main(argv):
  del argv
  cli_errors.run_library("rst2g_jax.interpret", FLAGS)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli_errors.parse_flags(FLAGS, argv, doc=__doc__))
