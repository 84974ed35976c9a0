"""`predict` end to end on phantoms the trained work directory never saw, written as NIfTI files.

  python -m benchmarks.predict_synthetic --workdir=W [--cases=8] [--mirror_tta]

Takes the held-out test exams of a work directory trained on the synthetic collection
(`splits.json`), writes each one's phases as `<case>_0000.nii.gz`, ... (what a user would
bring), runs `rst2g_jax.predict` on the folder with the fold ensemble and prints the Dice of
each mask against the phantom's truth, the mean, and the time per study (wall, after the
models are loaded and compiled).
"""
import json
import pathlib
import tempfile
import time

from absl import app, flags
import numpy as np
import SimpleITK as sitk

from rst2g_jax import evaluate
from rst2g_jax import input_pipeline
from rst2g_jax import predict
from tfds_builders import reader

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory trained on synthetic_dce.")
_CASES = flags.DEFINE_integer("cases", 8, "Held-out test exams to predict.")
_TTA = flags.DEFINE_bool("mirror_tta", False, "Average over the in-plane mirror flips.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  workdir = pathlib.Path(_WORKDIR.value).absolute()
  config = evaluate.trained_config(workdir)
  config.data.data_dir = config.data.data_dir or str(workdir / "tfds")
  source, cases = input_pipeline.open_source(config.data)
  test_ids = json.loads((workdir / "splits.json").read_text())["test"][:_CASES.value]
  predictor = predict.Predictor(workdir, eval_overrides={"mirror_tta": _TTA.value})
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    truth = {}
    for index in input_pipeline.record_indices(cases, test_ids):
      record = source[index]
      cid = input_pipeline._text(record["case_id"])  # pylint: disable=protected-access
      geometry = reader.Geometry.from_dict(record["source_geometry"])
      folder = root / "in" / cid
      folder.mkdir(parents=True)
      for p, phase in enumerate(record["image"]):
        sitk.WriteImage(geometry.image(phase), str(folder / f"{cid}_{p:04d}.nii.gz"))
      truth[cid] = np.asarray(record["mask"], bool)
    refs = predict.find_studies(root / "in")
    predict.predict_studies(predictor, refs[:1], root / "warm")    # compile outside the timing
    start = time.perf_counter()
    results, _ = predict.predict_studies(predictor, refs, root / "out")
    seconds = (time.perf_counter() - start) / len(results)
    dice = []
    for r in results:
      mask = sitk.GetArrayFromImage(sitk.ReadImage(str(r.outputs[0]))).astype(bool)
      ref = truth[r.name]
      denom = mask.sum() + ref.sum()
      dice.append(1.0 if denom == 0 else 2.0 * np.logical_and(mask, ref).sum() / denom)
      print(f"{r.name}: DSC {dice[-1]:.3f}")
  print(f"{len(results)} held-out exams, folds {predictor.folds}, mirror TTA {_TTA.value}: mean DSC {np.mean(dice):.3f}; "
        f"{seconds:.2f} s per study (read, preprocess, {len(predictor.folds)} folds, write)")


if __name__ == "__main__":
  app.run(main)
