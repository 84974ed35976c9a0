"""MAMA-MIA from its NIfTI release in manual_dir, one record per case, all phases kept.

Layout (file-name case varies between releases, so every name is matched
case-insensitively): `images/<ID>/<ID>_000<p>.nii.gz` (p = 0 pre-contrast, 1.. post),
`segmentations/expert/<ID>.nii.gz`, optionally `clinical_and_imaging_info.xlsx`
(phase times, sub-collection, phase count) and `train_test_splits.csv` (the official
split, used by the `official_split` config).
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import math
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import reader
from tfds_builders.base import CollectionBuilder, GridConfig, ManualDirError
from tfds_builders.records import CaseError

# Sub-collections in a fixed order: their index is the record's `strata`, so that splits
# are stratified by source collection (scanner, protocol and population differ between them).
SUB_COLLECTIONS = ("DUKE", "ISPY1", "ISPY2", "NACT")
CLINICAL_FILE = "clinical_and_imaging_info.xlsx"
SPLITS_FILE = "train_test_splits.csv"


@dataclasses.dataclass(eq=False)
class MamaMiaConfig(GridConfig):
  """Grid, and whether the official train/test split must be read and kept."""
  official_split: bool = False


@dataclasses.dataclass
class Case:
  """What `_load_case` needs for one case."""
  case_id: str                       # canonical (upper-case) MAMA-MIA id, e.g. DUKE_001
  folder: pathlib.Path               # images/<ID>
  mask: pathlib.Path | None
  clinical: dict[str, Any] | None    # the case's row of the clinical sheet


class Builder(CollectionBuilder):
  """DatasetBuilder for MAMA-MIA (Synapse syn60868042, manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "All DCE phases per case, expert masks, phase times and sub-collection from the clinical sheet."}
  BUILDER_CONFIGS = [
      MamaMiaConfig(name="default", shape=(60, 256, 256),
                    description="The paper's grid: 60 slices of 256 x 256."),
      MamaMiaConfig(name="official_split", shape=(60, 256, 256), official_split=True,
                    description="As default; the official train/test split is kept in info.metadata."),
  ]
  COLLECTION = "MAMA-MIA"
  DOWNLOAD = "https://doi.org/10.7303/syn60868042 (Synapse: `synapse get -r syn60868042`)"
  EXPECTED_LAYOUT = ("images/<ID>/<ID>_0000.nii.gz (pre), <ID>_0001.nii.gz, ... (post), "
                     "segmentations/expert/<ID>.nii.gz, optional clinical_and_imaging_info.xlsx and "
                     "train_test_splits.csv; names in any letter case")
  HOMEPAGE = "https://github.com/LidiaGarrucho/MAMA-MIA"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the MAMA-MIA release from " + DOWNLOAD + " and pass its folder (the one holding "
      "images/ and segmentations/) as manual_dir.")

  def _case_refs(self, dl_manager) -> list[tuple[str, Case]]:
    root = self.manual_path(dl_manager)
    images = reader.find_child(root, "images", self.COLLECTION)
    segs = reader.find_child(root, "segmentations", self.COLLECTION)
    expert = reader.find_child(segs, "expert", self.COLLECTION) if segs else None
    if images is None or not images.is_dir():
      found = sorted(p.name for p in root.iterdir())[:10]
      raise ManualDirError(f"{self.COLLECTION}: no images/ folder in {root} (found {found}); expected layout: "
                           f"{self.EXPECTED_LAYOUT}; download it from {self.DOWNLOAD}")
    clinical = read_clinical(root)
    cases = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
      mask = reader.find_child(expert, f"{folder.name}.nii.gz", folder.name) if expert else None
      case_id = folder.name.upper()
      cases.append(Case(case_id, folder, mask, clinical.get(case_id) if clinical is not None else None))
    if not cases:
      raise ManualDirError(f"{self.COLLECTION}: no case folders in {images}; expected layout: "
                           f"{self.EXPECTED_LAYOUT}; download it from {self.DOWNLOAD}")
    cases.sort(key=lambda c: c.case_id)
    if self.builder_config.official_split:
      self._official = read_official_split(root)
    return [(c.case_id, c) for c in cases]

  def _load_case(self, case: Case) -> dict[str, Any]:
    return load_case(case, self.grid_shape)

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    if self.builder_config.official_split:
      built = {c["case_id"] for c in self.info.metadata["cases"]}
      self.info.metadata["official_split"] = {
          part: [cid for cid in ids if cid in built] for part, ids in self._official.items()}


def _phase_files(case: Case) -> list[pathlib.Path]:
  """The case's phase files in phase order; CaseError when a phase number is missing."""
  numbered = {}
  for path in case.folder.iterdir():
    m = reader.PHASE_FILE_RE.match(path.name)
    if not m or m["id"].upper() != case.case_id or not path.name.lower().endswith((".nii", ".nii.gz")):
      continue
    phase = int(m["phase"])
    if phase in numbered:
      raise CaseError(f"{case.case_id}: phase {phase} given twice ({numbered[phase].name}, {path.name})")
    numbered[phase] = path
  return reader.ordered_phase_files(numbered, case.case_id, case.folder)


def load_case(case: Case, shape: tuple[int, int, int]) -> dict[str, Any]:
  """The record of one case: every phase, the expert mask, times, sub-collection strata."""
  cid = case.case_id
  files = _phase_files(case)
  if case.mask is None:
    raise CaseError(f"{cid}: expert segmentation segmentations/expert/{case.folder.name}.nii.gz not found")
  clinical = case.clinical or {}
  recorded = _number(clinical.get("num_phases"))
  if recorded is not None and int(recorded) != len(files):
    raise CaseError(f"{cid}: {len(files)} phase files, the clinical sheet records {int(recorded)} phases")
  times = _phase_times(clinical.get("acquisition_times"), len(files), cid)
  collection = str(clinical.get("dataset") or cid.split("_")[0]).strip().upper()
  if collection not in SUB_COLLECTIONS:
    raise CaseError(f"{cid}: sub-collection {collection!r} is not one of {', '.join(SUB_COLLECTIONS)}")
  phases = [reader.read_image(p) for p in files]
  mask = reader.read_image(case.mask, is_mask=True)
  return reader.make_record(phases, mask, shape, case_id=cid, patient_id=cid, phase_times=times,
                            strata=SUB_COLLECTIONS.index(collection), collection=collection)


def _number(value: Any) -> float | None:
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return None if math.isnan(number) else number


def _phase_times(value: Any, num_phases: int, cid: str) -> list[float]:
  """Phase times (s) from the sheet's `acquisition_times` ("[0, 90, 180]"); -1 each when absent."""
  if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "nan"):
    return [-1.0] * num_phases
  try:
    times = [float(t) for t in ast.literal_eval(str(value).strip())]
  except (ValueError, SyntaxError, TypeError):
    raise CaseError(f"{cid}: acquisition_times {str(value)[:60]!r} in the clinical sheet is not a list of numbers") from None
  if len(times) != num_phases:
    raise CaseError(f"{cid}: {len(times)} acquisition_times in the clinical sheet for {num_phases} phase files")
  return times


def read_clinical(root: pathlib.Path) -> dict[str, dict[str, Any]] | None:
  """Rows of `clinical_and_imaging_info.xlsx` (sheet `dataset_info`) by upper-case patient_id; None if absent."""
  path = reader.find_child(root, CLINICAL_FILE, "MAMA-MIA")
  if path is None:
    return None
  import openpyxl  # only needed when the sheet is there
  try:
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
  except Exception as e:  # noqa: BLE001 -- zip/xml errors of a damaged workbook
    raise CaseError(f"{path}: unreadable workbook ({type(e).__name__}: {str(e)[:120]})") from None
  sheet = book["dataset_info"] if "dataset_info" in book.sheetnames else book.worksheets[0]
  rows = sheet.iter_rows(values_only=True)
  header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
  if "patient_id" not in header:
    raise CaseError(f"{path}: sheet {sheet.title!r} has no patient_id column (columns: {header[:12]})")
  table = {}
  for row in rows:
    entry = dict(zip(header, row))
    if entry.get("patient_id"):
      table[str(entry["patient_id"]).strip().upper()] = entry
  book.close()
  return table


def read_official_split(root: pathlib.Path) -> dict[str, list[str]]:
  """The official split from `train_test_splits.csv` (columns train_split, test_split), upper-case ids."""
  path = reader.find_child(root, SPLITS_FILE, "MAMA-MIA")
  if path is None:
    raise ManualDirError(f"MAMA-MIA: config official_split needs {SPLITS_FILE} in {root}; it comes with the "
                         f"release at https://doi.org/10.7303/syn60868042")
  with open(path, newline="") as f:
    table = csv.DictReader(f)
    columns = {c.strip().lower(): c for c in table.fieldnames or ()}
    if "train_split" not in columns or "test_split" not in columns:
      raise CaseError(f"{path}: columns {table.fieldnames}, expected train_split and test_split")
    split = {"train": [], "test": []}
    for row in table:
      for part in split:
        value = (row.get(columns[f"{part}_split"]) or "").strip()
        if value:
          split[part].append(value.upper())
  if set(split["train"]) & set(split["test"]):
    raise CaseError(f"{path}: case(s) {sorted(set(split['train']) & set(split['test']))[:5]} are in both parts")
  return split


def official_splits(cases: list[dict], official: dict[str, list[str]], *, num_folds: int = 5,
                    seed: int = 0) -> dict[str, Any]:
  """A splits.json dict (rst2g_jax.splits format) whose test part is the official test set.

  The official training cases are dealt into `num_folds` folds per stratum (sub-collection),
  in a seeded random order, so that each fold holds about the same mix. Write it with
  `rst2g_jax.splits.save_splits(<workdir>/splits.json, ...)` before training: a work
  directory's existing splits file is the one training uses.
  """
  test = set(official["test"])
  train = [c for c in cases if c["case_id"] not in test]
  rng = np.random.default_rng(seed)
  folds: list[list[str]] = [[] for _ in range(num_folds)]
  position = 0
  for stratum in sorted({int(c["strata"]) for c in train}):
    ids = [c["case_id"] for c in train if int(c["strata"]) == stratum]
    for i in rng.permutation(len(ids)):
      folds[position % num_folds].append(ids[i])
      position += 1
  if any(not fold for fold in folds):
    raise ValueError(f"{len(train)} official training cases cannot make {num_folds} non-empty folds")
  order = {c["case_id"]: i for i, c in enumerate(cases)}
  return {"seed": int(seed), "test_fraction": len(test & set(order)) / max(len(cases), 1),
          "num_folds": int(num_folds),
          "test": [c["case_id"] for c in cases if c["case_id"] in test],
          "folds": [sorted(f, key=order.get) for f in folds],
          "strata": {c["case_id"]: int(c["strata"]) for c in cases}}


def write_official_splits(builder: Builder, workdir: str | pathlib.Path, *, num_folds: int = 5,
                          seed: int = 0) -> pathlib.Path:
  """Writes `<workdir>/splits.json` from a prepared `official_split` build; returns its path."""
  from rst2g_jax import splits as splits_lib  # pylint: disable=g-import-not-at-top
  official = builder.info.metadata.get("official_split")
  if official is None:
    raise ValueError(f"{builder.name}/{builder.builder_config.name} holds no official split; "
                     f"build it with --config=official_split")
  path = pathlib.Path(workdir) / "splits.json"
  splits_lib.save_splits(path, official_splits(list(builder.info.metadata["cases"]), official,
                                               num_folds=num_folds, seed=seed))
  return path
