"""Segments DCE-MRI studies with a trained work directory (DESIGN.md §7a).

  python -m rst2g_jax.predict --workdir=W --input=PATH --output=DIR [--folds=all|k,...] [--post_phase=k]
  python -m rst2g_jax.predict --workdir=W --pre=pre.nii.gz --post=post.nii.gz --output=DIR

`--input` is a DICOM study folder (any layout the shared reader supports: one series per
phase, or all phases in one series as in Breast-MRI-NACT-Pilot), a folder of NIfTI phase
files named `<id>_0000.nii.gz`, `<id>_0001.nii.gz`, ... (nnU-Net's `_0000` style, or
MAMA-MIA's `images/<id>/` folders), or a folder holding many such studies (batch mode).
Each study goes through training's preprocessing (the trained collection's grid, the
trained normalisation of pre, post and their difference), slabs slide over every slice
and are blended, the chosen folds' probabilities are averaged, mapped back onto the
input's own voxel grid, thresholded and optionally reduced to the largest component.

Written to DIR: `<study>.nii.gz` (uint8 mask in the input's geometry), for DICOM input
`<study>_seg.dcm` (a DICOM SEG referencing the post-contrast series), with
`--save_probabilities` `<study>_prob.nii.gz`, and `volumes.csv`; one line per study
gives the tumor volume in cc. Study names come from folder and file names, never from
DICOM patient identifiers, and the SEG carries the study name as its patient name and
id unless `--copy_patient_module`.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import re
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import ml_collections
import numpy as np
import pydicom
import SimpleITK as sitk

from rst2g_jax import cli_errors
from rst2g_jax import evaluate
from rst2g_jax import inference
from rst2g_jax import input_pipeline
from rst2g_jax import model as model_lib
from rst2g_jax import train_state as ts
from tfds_builders import reader
from tfds_builders.records import CaseError


class PredictError(ValueError):
  """The input, the work directory or a flag cannot be used; the message names it."""


# -- finding studies ---------------------------------------------------------------------
@dataclasses.dataclass
class StudyRef:
  """One study found under the input, not read yet."""
  name: str                                   # output file stem, from folder/file names
  kind: str                                   # "dicom" | "nifti"
  where: pathlib.Path
  phase_files: list[pathlib.Path] = dataclasses.field(default_factory=list)   # nifti
  series: list[reader.DicomSeries] = dataclasses.field(default_factory=list)  # dicom
  error: str | None = None                    # found while scanning (unreadable file)


@dataclasses.dataclass
class Study:
  """The phases of one study on their own grid (pre-contrast first)."""
  name: str
  phases: list[sitk.Image]
  phase_headers: list[list[reader.DicomHeader]] | None = None   # dicom: sorted files of each phase


def _safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "study"


def _unique(refs: list[StudyRef]) -> list[StudyRef]:
  seen: dict[str, int] = {}
  for ref in refs:
    base = ref.name
    seen[base] = seen.get(base, 0) + 1
    if seen[base] > 1:
      ref.name = f"{base}_{seen[base]}"
  return refs


def _nifti_studies(root: pathlib.Path) -> list[StudyRef]:
  groups: dict[tuple[pathlib.Path, str], dict[int, pathlib.Path]] = {}
  errors: dict[tuple[pathlib.Path, str], str] = {}
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    m = reader.PHASE_FILE_RE.match(path.name)
    if not m:
      continue
    key = (path.parent, m["id"])
    numbered = groups.setdefault(key, {})
    phase = int(m["phase"])
    if phase in numbered:
      errors.setdefault(key, f"phase {phase} given twice ({numbered[phase].name}, {path.name}) "
                             f"in {path.parent}")
    numbered[phase] = path
  refs = []
  for (folder, case_id), numbered in groups.items():
    ref = StudyRef(_safe_name(case_id), "nifti", folder, error=errors.get((folder, case_id)))
    try:
      ref.phase_files = reader.ordered_phase_files(numbered, case_id, folder)
    except CaseError as e:
      ref.error = ref.error or str(e)
    refs.append(ref)
  return refs


def _dicom_studies(root: pathlib.Path) -> list[StudyRef]:
  scan = reader.scan_dicom(root)
  refs = []
  for series in scan.studies().values():
    files = [h.path for s in series for h in s.headers]
    folder = pathlib.Path(os.path.commonpath([str(p.parent) for p in files]))
    rel = folder.relative_to(root)
    name = _safe_name("_".join(rel.parts) if rel.parts else root.absolute().name)
    refs.append(StudyRef(name, "dicom", folder, series=series))
  # A file whose header cannot be read is charged to the studies that share its folder.
  for path, message in scan.unreadable:
    owners = [r for r in refs if any(h.path.parent == path.parent for s in r.series for h in s.headers)]
    for ref in owners or [StudyRef(_safe_name(path.parent.name), "dicom", path.parent)]:
      ref.error = ref.error or message
      if ref not in refs:
        refs.append(ref)
  return refs


def find_studies(input_path: str | pathlib.Path | None = None, *, pre: str | None = None,
                 post: str | None = None) -> list[StudyRef]:
  """The studies named by `--input` (folder) or by `--pre` and `--post` (two image files)."""
  if pre or post:
    if input_path:
      raise PredictError("give --input or --pre/--post, not both")
    if not (pre and post):
      raise PredictError(f"--pre and --post go together (got only --{'pre' if pre else 'post'})")
    files = [pathlib.Path(pre), pathlib.Path(post)]
    for path in files:
      if not path.is_file():
        raise PredictError(f"{path}: no such image file")
    stem = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha)$", "", files[0].name, flags=re.I)
    return [StudyRef(_safe_name(re.sub(r"_0000$", "", stem)), "nifti", files[0].parent,
                     phase_files=files)]
  if not input_path:
    raise PredictError("no input: give --input=<study folder> or --pre=<file> --post=<file>")
  root = pathlib.Path(input_path)
  if not root.exists():
    raise PredictError(f"{root}: no such folder")
  if not root.is_dir():
    raise PredictError(f"{root}: a file; --input takes a folder (a DICOM study, NIfTI phase files "
                       f"<id>_0000.nii.gz, ..., or many studies); use --pre/--post for two files")
  refs = _nifti_studies(root) + _dicom_studies(root)
  if not refs:
    raise PredictError(f"{root}: no DICOM files and no NIfTI phase files (<id>_0000.nii.gz, "
                       f"<id>_0001.nii.gz, ...) below it")
  return _unique(sorted(refs, key=lambda r: r.name))


def load_study(ref: StudyRef) -> Study:
  """Reads a study's phases; CaseError / PredictError naming the study on bad input."""
  if ref.error:
    raise PredictError(f"{ref.name}: {ref.error}")
  if ref.kind == "nifti":
    if len(ref.phase_files) < 2:
      raise PredictError(f"{ref.name}: a single phase ({ref.phase_files[0].name}); a DCE study needs "
                         f"the pre-contrast and at least one post-contrast phase")
    return Study(ref.name, [reader.read_image(p) for p in ref.phase_files])
  roles = reader.classify_series(ref.series)
  mr = [s for s in ref.series if s.is_mr_image]
  if not roles.dce:
    if not mr:
      raise PredictError(f"{ref.name}: no MR image series in {ref.where} (only non-image DICOM "
                         f"objects such as SEG or reports); expected a DCE-MRI study")
    raise PredictError(f"{ref.name}: only single-phase MR series ({len(mr)}) in {ref.where}; a DCE "
                       f"study needs the pre-contrast and at least one post-contrast phase")
  phases = reader.split_phases(roles.dce, ref.name)
  if len(phases) < 2:
    raise PredictError(f"{ref.name}: the DCE series has a single phase")
  return Study(ref.name, [reader.read_volume(p.headers, ref.name) for p in phases],
               [p.headers for p in phases])


# -- the trained model ---------------------------------------------------------------------
def select_folds(spec: str, finished: Sequence[int], workdir: pathlib.Path) -> list[int]:
  """`all` or a comma list of fold numbers, each of them finished."""
  if str(spec).strip().lower() in ("", "all"):
    return list(finished)
  try:
    folds = sorted({int(f) for f in str(spec).split(",") if f.strip()})
  except ValueError:
    raise PredictError(f"--folds={spec!r}; expected 'all' or fold numbers like 0,2") from None
  missing = [f for f in folds if f not in finished]
  if missing or not folds:
    raise PredictError(f"{workdir}: fold(s) {missing or spec} not finished (finished: "
                       f"{', '.join(map(str, finished))})")
  return folds


@dataclasses.dataclass
class Prediction:
  probabilities: np.ndarray        # ensemble mean, (z, y, x) float32 on the input's grid
  mask: np.ndarray                 # (z, y, x) uint8 on the input's grid
  source: reader.Geometry
  per_fold_grid: list[np.ndarray]  # each fold's probabilities on the model grid

  @property
  def volume_cc(self) -> float:
    return float(self.mask.sum()) * float(np.prod(self.source.spacing)) / 1000.0


class Predictor:
  """A trained work directory's fold ensemble with training's preprocessing."""

  def __init__(self, workdir: str | pathlib.Path, *, folds: str = "all",
               post_phase: int | None = None, eval_overrides: dict[str, Any] | None = None):
    workdir = pathlib.Path(workdir).absolute()
    if not workdir.is_dir():
      raise PredictError(f"{workdir}: no such work directory")
    trained = evaluate.trained_config(workdir)
    self.folds = select_folds(folds, evaluate.finished_folds(workdir), workdir)
    config = ml_collections.ConfigDict(trained.to_dict())
    for key, value in (eval_overrides or {}).items():
      if value is not None:
        config.eval[key] = value
    config.mesh.data, config.mesh.distributed = -1, False
    self.config = config
    self.post_phase = int(config.data.post_phase if post_phase is None else post_phase)
    self.grid = evaluate.collection_grid(config.data)
    if self.grid[1:] != model_lib.image_size(config.model):
      raise PredictError(f"{workdir}: trained grid {self.grid} does not match model.image_size "
                         f"{model_lib.image_size(config.model)}")
    self.ensemble = evaluate.FoldEnsemble(config, workdir, self.folds, ts.make_mesh(config.mesh))

  def prepare(self, study: Study) -> tuple[np.ndarray, reader.Geometry, reader.Geometry]:
    """Training's preprocessing: ([S, H, W, 3] normalised volume, source geometry, grid geometry)."""
    image, source, grid = reader.grid_phases(study.phases, self.grid, study.name)
    volume = input_pipeline.normalize_case(
        image, post_phase=self.post_phase, method=str(self.config.data.normalization),
        case_id=study.name)
    return volume, source, grid

  def predict(self, study: Study) -> Prediction:
    return self.predict_prepared(study.name, *self.prepare(study))

  def predict_prepared(self, name: str, volume: np.ndarray, source: reader.Geometry,
                       grid: reader.Geometry) -> Prediction:
    """`predict` of a study already through `prepare`."""
    per_fold, mean = self.ensemble.probabilities({"image": volume, "case_id": name})
    probs, mask = to_source(mean, grid, source, threshold=float(self.config.eval.threshold),
                            keep_largest=bool(self.config.eval.largest_component))
    return Prediction(probs, mask, source, per_fold)


def to_source(probs: np.ndarray, grid: reader.Geometry, source: reader.Geometry, *,
              threshold: float = 0.5, keep_largest: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Model-grid probabilities -> (probabilities, uint8 mask) on the input's own voxel grid.

  Probabilities are interpolated linearly and thresholded there (not the grid's mask
  taken by nearest neighbour), so the mask follows the tumor's edge at the input's
  resolution; the largest component is then found on the input's grid.
  """
  on_source = reader.to_array(reader.resample(grid.image(np.asarray(probs, np.float32)), source,
                                              is_mask=False))
  on_source = np.clip(on_source, 0.0, 1.0).astype(np.float32)
  mask = inference.segment(on_source, threshold=threshold, keep_largest=keep_largest)
  return on_source, mask.astype(np.uint8)


# -- outputs --------------------------------------------------------------------------------
# Patient / study attributes highdicom copies from the source that can identify a person.
_IDENTIFYING = ("PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight", "PatientSize",
                "AccessionNumber", "ReferringPhysicianName", "OtherPatientIDs",
                "OtherPatientIDsSequence", "IssuerOfPatientID", "InstitutionName", "StudyID",
                "StudyDate", "StudyTime")


# Type 2 patient / study attributes highdicom copies from the source images (must exist).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _replace(path: pathlib.Path, write) -> None:
  """Writes through a hidden temporary in the same folder, so no half file looks complete."""
  tmp = path.with_name(f".tmp-{path.name}")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_nifti(path: pathlib.Path, array: np.ndarray, geometry: reader.Geometry) -> None:
  _replace(path, lambda tmp: sitk.WriteImage(geometry.image(array), str(tmp), True))


def dicom_seg(study: Study, mask: np.ndarray, post_phase: int, *,
              copy_patient_module: bool = False) -> pydicom.Dataset:
  """A binary DICOM SEG of `mask` referencing the post-contrast phase's images."""
  import highdicom as hd  # pylint: disable=g-import-not-at-top
  from pydicom.sr.codedict import codes  # pylint: disable=g-import-not-at-top
  headers = study.phase_headers[post_phase]
  # Headers only (highdicom needs no pixels), sorted along the normal as `mask` is.
  sources = [pydicom.dcmread(h.path, stop_before_pixels=True) for h in headers]
  for ds in sources:   # type 2 attributes the SEG copies; exports often leave them out
    for keyword in _TYPE2_COPIED:
      if keyword not in ds:
        setattr(ds, keyword, "")
  description = hd.seg.SegmentDescription(
      segment_number=1, segment_label="tumor",
      segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
      segmented_property_type=codes.SCT.Neoplasm,
      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
      algorithm_identification=hd.AlgorithmIdentificationSequence(
          name="RST2G-JAX", version="0.1", family=codes.DCM.ArtificialIntelligence))
  try:
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.asarray(mask, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="RST2G-JAX",
        manufacturer_model_name="RST2G", software_versions="rst2g_jax 0.1",
        device_serial_number="none", series_description="RST2G tumor segmentation",
        omit_empty_frames=bool(mask.any()))
  except (ValueError, AttributeError, TypeError) as e:
    raise PredictError(f"{study.name}: cannot make a DICOM SEG on its post-contrast series "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if not copy_patient_module:
    seg.PatientName, seg.PatientID = study.name, study.name
    for keyword in _IDENTIFYING:
      if keyword in seg:
        if seg[keyword].VR == "SQ":
          delattr(seg, keyword)
        else:
          seg[keyword].value = ""
  return seg


@dataclasses.dataclass
class StudyResult:
  name: str
  voxels: int
  volume_cc: float
  outputs: list[pathlib.Path]


def write_study(study: Study, prediction: Prediction, out_dir: pathlib.Path, *, post_phase: int,
                save_probabilities: bool = False, seg: bool = True,
                copy_patient_module: bool = False) -> StudyResult:
  """The study's files in `out_dir`; the mask last, so its presence means the study is done."""
  out_dir.mkdir(parents=True, exist_ok=True)
  outputs = []
  if save_probabilities:
    outputs.append(out_dir / f"{study.name}_prob.nii.gz")
    write_nifti(outputs[-1], prediction.probabilities, prediction.source)
  if seg and study.phase_headers is not None:
    dataset = dicom_seg(study, prediction.mask, post_phase, copy_patient_module=copy_patient_module)
    outputs.append(out_dir / f"{study.name}_seg.dcm")
    _replace(outputs[-1], lambda tmp: dataset.save_as(tmp, enforce_file_format=True))
  outputs.insert(0, out_dir / f"{study.name}.nii.gz")
  write_nifti(outputs[0], prediction.mask, prediction.source)
  return StudyResult(study.name, int(prediction.mask.sum()), prediction.volume_cc, outputs)


def predict_studies(predictor: Predictor, refs: Sequence[StudyRef], out_dir: str | pathlib.Path, *,
                    on_error: str = "fail", save_probabilities: bool = False, seg: bool = True,
                    copy_patient_module: bool = False) -> tuple[list[StudyResult], list[tuple[str, str]]]:
  """Every study through the ensemble, one progress bar; (results, skipped (name, reason))."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if on_error not in ("fail", "skip"):
    raise PredictError(f"--on_error={on_error!r}; expected 'fail' or 'skip'")
  out_dir = pathlib.Path(out_dir)
  results, skipped = [], []
  bar = tqdm(refs, desc="predict", unit="study", file=sys.stderr, disable=len(refs) < 2)
  for ref in bar:
    try:
      study = load_study(ref)
      prediction = predictor.predict(study)
      result = write_study(study, prediction, out_dir, post_phase=predictor.post_phase,
                           save_probabilities=save_probabilities, seg=seg,
                           copy_patient_module=copy_patient_module)
    except (PredictError, CaseError) as e:
      if on_error == "fail":
        raise
      skipped.append((ref.name, " ".join(str(e).split())))
      tqdm.write(f"skipped {ref.name}: {skipped[-1][1]}", file=sys.stderr)
      continue
    results.append(result)
    tqdm.write(f"{result.name}: tumor volume {result.volume_cc:.3f} cc ({result.voxels} voxels) "
               f"-> {result.outputs[0]}")
  if results:
    def write_csv(tmp):
      with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study", "voxels", "volume_cc", "mask"])
        for r in results:
          w.writerow([r.name, r.voxels, f"{r.volume_cc:.6f}", r.outputs[0].name])
    _replace(out_dir / "volumes.csv", write_csv)
  return results, skipped


# -- command line ----------------------------------------------------------------------------
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A work directory trained with `python -m rst2g_jax.main`.",
                    flag_values=FLAGS)
flags.DEFINE_string("input", None, "A DICOM study folder, a folder of NIfTI phase files "
                    "(<id>_0000.nii.gz, ...), or a folder of many studies.", flag_values=FLAGS)
flags.DEFINE_string("pre", None, "Pre-contrast image file (with --post, instead of --input).",
                    flag_values=FLAGS)
flags.DEFINE_string("post", None, "Post-contrast image file (with --pre).", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_string("folds", "all", "'all' or comma-separated fold numbers to ensemble.",
                    flag_values=FLAGS)
flags.DEFINE_integer("post_phase", None, "Post-contrast phase (1 = first after the pre-contrast "
                     "phase); default: the trained config's data.post_phase.", flag_values=FLAGS)
flags.DEFINE_float("threshold", None, "Probability threshold (default: trained eval.threshold).",
                   flag_values=FLAGS)
flags.DEFINE_bool("largest_component", None, "Keep only the largest connected component "
                  "(default: trained eval.largest_component).", flag_values=FLAGS)
flags.DEFINE_bool("mirror_tta", None, "Average over the in-plane mirror flips (default: trained "
                  "eval.mirror_tta).", flag_values=FLAGS)
flags.DEFINE_enum("blend", None, ["gaussian", "uniform"], "Slab blending (default: trained "
                  "eval.blend).", flag_values=FLAGS)
flags.DEFINE_integer("slab_step", None, "Slices between slab starts (default: trained "
                     "eval.slab_step).", flag_values=FLAGS)
flags.DEFINE_bool("save_probabilities", False, "Also write <study>_prob.nii.gz.", flag_values=FLAGS)
flags.DEFINE_bool("dicom_seg", True, "Write <study>_seg.dcm for DICOM input.", flag_values=FLAGS)
flags.DEFINE_bool("copy_patient_module", False, "Copy the source's patient identifiers into the "
                  "DICOM SEG (to file it with the study in a PACS); otherwise its patient name and "
                  "id are the study name.", flag_values=FLAGS)
flags.DEFINE_enum("on_error", "fail", ["fail", "skip"], "A bad study stops the run (fail) or is "
                  "reported and skipped (skip).", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "output"], flag_values=FLAGS)


def run(f) -> tuple[list[StudyResult], list[tuple[str, str]]]:
  """The command, from parsed flags (a FlagValues or any object with the same attributes)."""
  refs = find_studies(f.input, pre=f.pre, post=f.post)
  if f.pre and f.post_phase not in (None, 1):
    raise PredictError(f"--post_phase={f.post_phase} with --pre/--post: the --post file is phase 1")
  post_phase = 1 if f.pre else f.post_phase   # the --post file is the study's phase 1
  predictor = Predictor(f.workdir, folds=f.folds, post_phase=post_phase, eval_overrides={
      "threshold": f.threshold, "largest_component": f.largest_component,
      "mirror_tta": f.mirror_tta, "blend": f.blend, "slab_step": f.slab_step})
  print(f"{len(refs)} stud{'y' if len(refs) == 1 else 'ies'}; folds {predictor.folds} of "
        f"{pathlib.Path(f.workdir).name}; model grid {predictor.grid}, post phase "
        f"{predictor.post_phase}", flush=True)
  results, skipped = predict_studies(
      predictor, refs, f.output, on_error=f.on_error, save_probabilities=f.save_probabilities,
      seg=f.dicom_seg, copy_patient_module=f.copy_patient_module)
  if skipped:
    print(f"{len(skipped)} of {len(refs)} studies skipped", file=sys.stderr, flush=True)
  if not results:
    raise PredictError(f"{f.input or f.pre}: no study could be segmented")
  return results, skipped


def main(argv):
  del argv
  cli_errors.run_library("rst2g_jax.predict", FLAGS)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli_errors.parse_flags(FLAGS, argv, doc=__doc__))
