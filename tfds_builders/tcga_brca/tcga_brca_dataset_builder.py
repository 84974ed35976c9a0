"""TCGA-BRCA (TCIA) DCE-MRI from a manual DICOM download, one record per keyed study.

Series roles are not usable from the headers, so they come from the public series key
(`tcga_brca/tcga_brca_key.yaml` of github.com/nyukat/MRI_AI), which lists per subject and
study the DCE series by SeriesNumber: `t1pre`, `t1c1`..`t1c6` (one volume each),
`multiVolumeT1` (all phases in one series) or `t1pre` + `multiVolumeT1Postcontrast`;
multi-volume series are split into phases by the shared reader (TriggerTime). Tumor masks
come from the TCGA-Breast-Radiogenomics lesion files (`<subject>*.les`: a voxel box and
its voxels per lesion), united and placed on the DCE grid.

Studies the key excludes, studies of splitBilateral layout and studies without a lesion
file are always listed as skipped with the reason (`base.CaseSkipped`), never a failure.
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import yaml

from tfds_builders import reader
from tfds_builders.base import CaseSkipped, CollectionBuilder, GridConfig, ManualDirError
from tfds_builders.records import CaseError

KEY_URL = "https://github.com/nyukat/MRI_AI/blob/master/tcga_brca/tcga_brca_key.yaml"
_BARCODE = re.compile(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}")
_LESION_NAME = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}).*\.les$", re.IGNORECASE)
_KEY_DATE = re.compile(r"^(\d{2})-(\d{2})-(\d{4})")      # study folder names start MM-DD-YYYY
_POST = re.compile(r"^t1c([1-9])$")
# Strata: fixed tumor-volume classes, 0: < 2 cc, 1: 2-10 cc, 2: >= 10 cc (set by hand; the
# lesion files are semi-automatic FCM segmentations of a few cc).
TUMOR_STRATA_CC = (2.0, 10.0)


@dataclasses.dataclass(eq=False)
class TcgaConfig(GridConfig):
  """Grid, where the series key is, and how a lesion file's z index counts slices.

  key_file: path of tcga_brca_key.yaml, relative to manual_dir unless absolute.
  lesion_z: "instance_number" -- z counts the annotated DCE's images ordered by
    InstanceNumber, phase after phase (the order a DICOM viewer loads a series in);
    "slice_position" -- z counts slices along the slice normal, phase after phase.
  """
  key_file: str = "tcga_brca_key.yaml"
  lesion_z: str = "instance_number"


@dataclasses.dataclass
class Study:
  """What `_load_case` needs for one DICOM study."""
  case_id: str
  patient_id: str
  series: list[reader.DicomSeries]
  key_name: str = ""
  key_entry: dict | None = None
  lesions: list[pathlib.Path] = dataclasses.field(default_factory=list)
  error: str | None = None          # CaseError
  skip: str | None = None           # CaseSkipped


class Builder(CollectionBuilder):
  """DatasetBuilder for TCGA-BRCA DCE-MRI + TCGA-Breast-Radiogenomics lesions (manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "DCE phases from the nyukat series key, tumor = union of the study's lesion files."}
  BUILDER_CONFIGS = [TcgaConfig(name="default", shape=(60, 256, 256),
                                description="The paper's grid: 60 slices of 256 x 256.")]
  COLLECTION = "TCGA-BRCA"
  DOWNLOAD = ("https://www.cancerimagingarchive.net/collection/tcga-brca/ (MR images, NBIA Data Retriever) and "
              "https://www.cancerimagingarchive.net/analysis-result/tcga-breast-radiogenomics/ (lesion files)")
  EXPECTED_LAYOUT = ("the TCIA DICOM download (any folder names and depth), tcga_brca_key.yaml from " + KEY_URL +
                     ", and the TCGA-Breast-Radiogenomics lesion files <subject>*.les anywhere below manual_dir")
  HOMEPAGE = "https://doi.org/10.7937/K9/TCIA.2016.AB2NAZRP"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put into one folder: the TCGA-BRCA MR DICOM download, the TCGA-Breast-Radiogenomics lesion files "
      "(*.les) and tcga_brca_key.yaml (" + KEY_URL + "); pass that folder as manual_dir.")

  def _case_refs(self, dl_manager) -> list[tuple[str, Study]]:
    root = self.manual_path(dl_manager)
    config = self.builder_config
    if config.lesion_z not in ("instance_number", "slice_position"):
      raise ValueError(f"lesion_z must be 'instance_number' or 'slice_position', got {config.lesion_z!r}")
    key_path = pathlib.Path(config.key_file)
    key_path = key_path if key_path.is_absolute() else root / key_path
    key = read_key(key_path, self.COLLECTION)
    lesions = collections.defaultdict(list)
    for path in sorted(root.rglob("*")):
      m = _LESION_NAME.match(path.name)
      if m and path.is_file():
        lesions[m[1].upper()].append(path)
    scan = reader.scan_dicom(root)
    studies = match_studies(scan, key, lesions)
    if not studies:
      raise ManualDirError(f"{self.COLLECTION}: no DICOM studies below {root}; expected layout: "
                           f"{self.EXPECTED_LAYOUT}; download it from {self.DOWNLOAD}")
    return [(s.case_id, s) for s in studies]

  def _load_case(self, study: Study) -> dict[str, Any]:
    if study.skip:
      raise CaseSkipped(f"{study.case_id}: {study.skip}")
    if study.error:
      raise CaseError(f"{study.case_id}: {study.error}")
    return load_study(study, self.grid_shape, self.builder_config.lesion_z)


def read_key(path: pathlib.Path, collection: str) -> dict[str, dict]:
  """The key's `subjects` mapping; ManualDirError when the file is missing, CaseError when malformed."""
  if not path.is_file():
    raise ManualDirError(f"{collection}: series key {path} not found; download tcga_brca_key.yaml from "
                         f"{KEY_URL} into manual_dir")
  try:
    key = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise CaseError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
  if not isinstance(key, dict) or not isinstance(key.get("subjects"), dict):
    raise CaseError(f"{path}: expected a mapping with 'subjects: <TCGA barcode>: studies: ...' (the nyukat key format)")
  return key["subjects"]


def _key_date(name: str) -> str | None:
  m = _KEY_DATE.match(str(name))
  return f"{m[3]}{m[1]}{m[2]}" if m else None


def exclusion(entry: dict | None) -> str | None:
  """Why the key's study entry is not a usable DCE exam, or None."""
  if not isinstance(entry, dict):
    return "the key has no entry for this study"
  comment = " ".join(str(entry.get("comment") or "").split())
  laterality = entry.get("lateralityType")
  if re.search(r"exclu", comment, re.IGNORECASE):
    return f"excluded by the key ({comment[:100]})"
  if not laterality or laterality == "unknown":
    return "excluded by the key (laterality unknown" + (f": {comment[:100]})" if comment else ")")
  if not entry.get("series"):
    return "excluded by the key (no series listed)"
  if laterality == "splitBilateral":
    return "splitBilateral study (each breast in its own series): not supported"
  return None


def match_studies(scan: reader.ScanResult, key: dict, lesions: dict[str, list]) -> list[Study]:
  """One Study per DICOM study, matched to the key by subject (PatientID) and study date.

  Case ids are `<subject>_<n>`, n numbering the subject's studies by date. A subject's lesion
  files belong to its first usable keyed study (the Radiogenomics analysis annotated one
  baseline exam per subject); its other studies are skipped for want of a lesion file.
  """
  studies = []
  by_subject = collections.defaultdict(list)
  for series in scan.studies().values():
    first = series[0].first
    patient = first.patient_id.strip().upper()
    if not _BARCODE.fullmatch(patient):
      # Never echo the value: it is not a de-identified TCGA barcode.
      studies.append(Study(str(first.path.parent), "", series, error="PatientID is not a TCGA barcode (TCGA-XX-XXXX)"))
      continue
    by_subject[patient].append(series)
  for patient, group in sorted(by_subject.items()):
    group.sort(key=lambda s: (s[0].first.study_date, s[0].study_uid))
    entries = ((key.get(patient) or {}).get("studies") or {}) if isinstance(key.get(patient), dict) else {}
    subject_studies = []
    for n, series in enumerate(group, start=1):
      study = Study(f"{patient}_{n}", patient, series)
      date = series[0].first.study_date
      names = [name for name in entries if _key_date(name) == date]
      if len(names) > 1:  # several keyed studies on one day: the folder suffix is the StudyInstanceUID's tail
        names = [name for name in names if str(name).rstrip().endswith(series[0].study_uid[-5:])] or names
      if not names:
        study.skip = "study not in the series key" + ("" if entries else " (no studies listed for this subject)")
      elif len(names) > 1:
        study.error = f"several key studies on its date ({', '.join(map(str, names))}) and none matches its UID"
      else:
        study.key_name, study.key_entry = str(names[0]), entries[names[0]]
        study.skip = exclusion(study.key_entry)
      subject_studies.append(study)
    usable = [s for s in subject_studies if not s.skip and not s.error]
    if usable:
      if lesions.get(patient):
        usable[0].lesions = list(lesions[patient])
        for s in usable[1:]:
          s.skip = f"no lesion file (the subject's lesion files are placed on its first study, {usable[0].case_id})"
      else:
        for s in usable:
          s.skip = "no lesion file for this subject"
    studies.extend(subject_studies)
  # A file whose header cannot be read is charged to the studies sharing its folder.
  for path, message in scan.unreadable:
    owners = [s for s in studies if any(h.path.parent == path.parent for x in s.series for h in x.headers)]
    for s in owners:
      s.error = s.error or message
    if not owners:
      studies.append(Study(str(path), "", [], error=message))
  return sorted(studies, key=lambda s: s.case_id)


def _phases(study: Study) -> list[reader.Phase]:
  """The DCE phases in acquisition order, from the key's series roles."""
  cid, roles = study.case_id, study.key_entry["series"]
  by_number = collections.defaultdict(list)
  for s in study.series:
    by_number[s.first.series_number].append(s)

  def series(number, role) -> reader.DicomSeries:
    found = by_number.get(int(number), [])
    if len(found) != 1:
      raise CaseError(f"{cid}: key series {number} ({role}) is {'missing from' if not found else 'ambiguous in'} "
                      f"the download (study {study.key_name})")
    return found[0]

  by_role = collections.defaultdict(list)
  for number, role in roles.items():
    by_role[str(role)].append(number)
  for role, numbers in by_role.items():
    if len(numbers) > 1 and (role == "t1pre" or _POST.match(role) or role.startswith("multiVolume")):
      raise CaseError(f"{cid}: the key gives {len(numbers)} series ({numbers}) the role {role}, expected one")
  if "multiVolumeT1" in by_role:
    if set(by_role) & ({"t1pre", "multiVolumeT1Postcontrast"} | {r for r in by_role if _POST.match(r)}):
      raise CaseError(f"{cid}: the key lists multiVolumeT1 together with other DCE series")
    return reader.split_phases([series(by_role["multiVolumeT1"][0], "multiVolumeT1")], cid)
  if "t1pre" not in by_role:
    raise CaseError(f"{cid}: the key lists no t1pre series (roles {sorted(by_role)})")
  phases = [reader.single_phase(series(by_role["t1pre"][0], "t1pre").headers, cid)]
  posts = sorted((int(_POST.match(r)[1]), r) for r in by_role if _POST.match(r))
  if [n for n, _ in posts] != list(range(1, len(posts) + 1)):
    raise CaseError(f"{cid}: the key's post-contrast roles {[r for _, r in posts]} skip a number")
  phases += [reader.single_phase(series(by_role[r][0], r).headers, cid) for _, r in posts]
  if "multiVolumeT1Postcontrast" in by_role:
    if posts:
      raise CaseError(f"{cid}: the key lists multiVolumeT1Postcontrast together with t1c<n> series")
    post = series(by_role["multiVolumeT1Postcontrast"][0], "multiVolumeT1Postcontrast")
    phases += reader.split_phases([post], cid)
  return phases


def lesion_mask(phases: list[reader.Phase], lesions: list[pathlib.Path], shape_zyx, lesion_z: str,
                name: str) -> np.ndarray:
  """The union of the lesion files' voxels on the DCE grid (phase 0's slices), (z, y, x) uint8.

  A lesion's z counts the DCE's images phase after phase (a multi-volume series is one
  stack); each z is mapped to the slice at its image's position.
  """
  z_map = []
  for phase in phases:        # phase.headers are sorted along the slice normal, like the volume
    order = range(len(phase.headers))
    if lesion_z == "instance_number":
      order = sorted(order, key=lambda k: (phase.headers[k].instance_number is None,
                                           phase.headers[k].instance_number or 0, k))
    z_map.extend(order)
  mask = np.zeros(shape_zyx, np.uint8)
  for path in lesions:
    lesion = reader.read_lesion_file(path, name)
    (z0, y0, x0), (z1, y1, x1) = lesion.start, lesion.end
    if z1 >= len(z_map) or y1 >= shape_zyx[1] or x1 >= shape_zyx[2]:
      raise CaseError(f"{name}: lesion file {path.name} box z {z0}-{z1}, y {y0}-{y1}, x {x0}-{x1} lies outside "
                      f"the DCE images ({len(z_map)} images of {shape_zyx[1]} x {shape_zyx[2]})")
    for dz, z in enumerate(range(z0, z1 + 1)):
      mask[z_map[z], y0:y1 + 1, x0:x1 + 1] |= lesion.voxels[dz]
  return mask


def load_study(study: Study, shape, lesion_z: str) -> dict[str, Any]:
  """The record of one study: DCE phases from the key, lesion mask, volume strata, site."""
  cid = study.case_id
  phases = _phases(study)
  volumes = [reader.read_volume(p.headers, cid) for p in phases]
  reference = reader.Geometry.of(volumes[0])
  mask = lesion_mask(phases, study.lesions, reference.shape_zyx, lesion_z, cid)
  if not mask.any():
    raise CaseError(f"{cid}: the lesion files {[p.name for p in study.lesions]} hold no lesion voxels")
  tumor_cc = float(mask.sum()) * float(np.prod(reference.spacing)) / 1000.0
  strata = int(tumor_cc >= TUMOR_STRATA_CC[0]) + int(tumor_cc >= TUMOR_STRATA_CC[1])
  return reader.make_record(volumes, reference.image(mask), shape, case_id=cid, patient_id=study.patient_id,
                            phase_times=[-1.0 if p.time is None else p.time for p in phases], strata=strata,
                            collection=study.patient_id.split("-")[1])   # tissue source site, e.g. AR
