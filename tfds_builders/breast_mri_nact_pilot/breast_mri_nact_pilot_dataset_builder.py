"""Breast-MRI-NACT-Pilot (TCIA) from a manual DICOM download, one record per exam.

Per exam (one StudyInstanceUID): the DCE series (3 phases in one series, split by
InstanceNumber blocks), the breast VOI (DICOM SEG) and the SER map. The tumor is the
collection's functional tumor volume, VOI AND SER > 0, which reproduces the volume
the site recorded in the SEG (exam UCSF-BR-06 T1: 41,105 voxels, 40.643 cc).
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from typing import Any

import numpy as np
import pydicom
import tensorflow_datasets as tfds

from tfds_builders import reader
from tfds_builders.base import CollectionBuilder, GridConfig, ManualDirError
from tfds_builders.records import CaseError

# UCSF BIRP private block: (0117,1030) number of phases, (0117,1034) phase times (s from injection).
_UCSF_CREATOR = "UCSF BIRP PRIVATE CREATOR 011710xx"
_NUM_PHASES, _PHASE_TIMES = 0x30, 0x34
_SUBJECT_ID = re.compile(r"UCSF-BR-\d+")
# Strata: tumor volume classes, 0: < 10 cc, 1: 10-30 cc, 2: >= 30 cc (fixed, so a record
# does not depend on which other exams were built).
FTV_STRATA_CC = (10.0, 30.0)


@dataclasses.dataclass
class Exam:
  """What `_load_case` needs: the exam's series, or the error found while scanning."""
  case_id: str
  patient_id: str
  series: list[reader.DicomSeries]
  error: str | None = None


class Builder(CollectionBuilder):
  """DatasetBuilder for Breast-MRI-NACT-Pilot (TCIA, manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "DCE phases, tumor = breast VOI (SEG) AND SER > 0, phase times from the SEG."}
  BUILDER_CONFIGS = [GridConfig(name="default", shape=(60, 256, 256),
                                description="The paper's grid: 60 slices of 256 x 256.")]
  COLLECTION = "Breast-MRI-NACT-Pilot"
  DOWNLOAD = ("https://www.cancerimagingarchive.net/collection/breast-mri-nact-pilot/ "
              "(NBIA Data Retriever, 'Descriptive Directory Name' or classic layout)")
  EXPECTED_LAYOUT = ("the TCIA DICOM download, any folder names and depth: per exam the DCE series, "
                     "its SER map and the breast VOI DICOM SEG")
  HOMEPAGE = "https://doi.org/10.7937/K9/TCIA.2016.QHsyhJKy"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the collection's DICOM files with the NBIA Data Retriever from " + DOWNLOAD +
      " and pass the download folder as manual_dir.")

  def _case_refs(self, dl_manager) -> list[tuple[str, Exam]]:
    root = self.manual_path(dl_manager)
    scan = reader.scan_dicom(root)
    exams = [_exam_ids(series) for series in scan.studies().values()]
    _number_visits(exams)
    # A file whose header cannot be read is charged to the exam(s) sharing its folder.
    for path, message in scan.unreadable:
      owners = [e for e in exams if any(h.path.parent == path.parent for s in e.series for h in s.headers)]
      if not owners:
        exams.append(Exam(str(path.relative_to(root)), "", [], message))
      for exam in owners:
        exam.error = exam.error or message
    if not exams:
      raise ManualDirError(f"{self.COLLECTION}: no DICOM files below {root}; expected layout: "
                           f"{self.EXPECTED_LAYOUT}; download it from {self.DOWNLOAD}")
    exams.sort(key=lambda e: e.case_id)
    ids = collections.Counter(e.case_id for e in exams)
    if dupes := [c for c, n in ids.items() if n > 1]:
      raise CaseError(f"{self.COLLECTION}: several exams share the case id(s) {dupes[:5]}")
    return [(e.case_id, e) for e in exams]

  def _load_case(self, exam: Exam) -> dict[str, Any]:
    if exam.error:
      raise CaseError(f"{exam.case_id}: {exam.error}")
    return load_exam(exam, self.grid_shape)


def _exam_ids(series: list[reader.DicomSeries]) -> Exam:
  """Case id `<subject>_<visit>` from PatientID (the de-identified TCIA subject id) and time point."""
  first = series[0].first
  patient = first.patient_id.strip()
  if not _SUBJECT_ID.fullmatch(patient):
    # Never echo the value: outside this collection PatientID may identify a person.
    return Exam(str(first.path.parent), "", series,
                "PatientID is not a Breast-MRI-NACT-Pilot subject id (UCSF-BR-<n>)")
  visit = next((h.time_point_id for s in series for h in s.headers[:1] if h.time_point_id), "")
  return Exam(f"{patient}_{visit}" if visit else "", patient, series)


def _number_visits(exams: list[Exam]) -> None:
  """Exams without ClinicalTrialTimePointID are numbered V1, V2, ... by StudyDate per subject."""
  by_patient = collections.defaultdict(list)
  for e in exams:
    if not e.case_id and not e.error:
      by_patient[e.patient_id].append(e)
  for patient, group in by_patient.items():
    group.sort(key=lambda e: (e.series[0].first.study_date, e.series[0].study_uid))
    for n, e in enumerate(group, start=1):
      e.case_id = f"{patient}_V{n}"


def _one(series: list[reader.DicomSeries], what: str, case_id: str) -> reader.DicomSeries:
  if not series:
    raise CaseError(f"{case_id}: no {what} in the exam")
  if len(series) > 1:
    raise CaseError(f"{case_id}: {len(series)} {what} series in the exam, expected one")
  return series[0]


def load_exam(exam: Exam, shape: tuple[int, int, int]) -> dict[str, Any]:
  """The record of one exam: DCE phases, FTV mask, phase times, ids, strata."""
  cid = exam.case_id
  roles = reader.classify_series(exam.series)
  segs = roles.seg
  if len(segs) > 1:  # prefer the breast VOI when an exam carries other segmentations
    segs = [s for s in segs if re.search(r"VOI|breast", s.first.description, re.I)] or segs
  seg = _one(segs, "breast VOI (DICOM SEG)", cid)
  ser = _one(roles.ser, "SER map", cid)
  if not roles.dce:
    raise CaseError(f"{cid}: no DCE series (no MR image series with several phases)")
  phases, _ = reader.read_dicom_phases(roles.dce, cid)
  ser_image = reader.read_volume(ser.headers, cid)
  reference = reader.Geometry.of(phases[0])
  reader.check_geometry(reference, reader.Geometry.of(ser_image), f"{cid}: SER map")
  voi = reader.read_seg(seg.first.path, phases[0], cid)
  mask = ((voi > 0) & (reader.to_array(ser_image) > 0)).astype(np.uint8)
  times = _phase_times(seg.first.path, len(phases), cid)
  voxel_cc = float(np.prod(reference.spacing)) / 1000.0
  ftv_cc = float(mask.sum()) * voxel_cc
  strata = int(ftv_cc >= FTV_STRATA_CC[0]) + int(ftv_cc >= FTV_STRATA_CC[1])
  return reader.make_record(phases, reference.image(mask), shape, case_id=cid,
                            patient_id=exam.patient_id, phase_times=times, strata=strata,
                            collection="UCSF")


def _phase_times(seg_path: pathlib.Path, num_phases: int, cid: str) -> list[float]:
  """Phase times from the SEG's UCSF private tags; -1 each when absent.

  The site also records its number of phases there, which catches an exam whose DCE
  series lost a whole phase.
  """
  ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
  recorded = reader.private_value(ds, 0x0117, _UCSF_CREATOR, _NUM_PHASES)
  times = reader.private_value(ds, 0x0117, _UCSF_CREATOR, _PHASE_TIMES)
  if recorded is not None and int(recorded) != num_phases:
    raise CaseError(f"{cid}: the DCE series has {num_phases} phases, the site recorded {int(recorded)}")
  if times is None:
    return [-1.0] * num_phases
  times = [float(t) for t in (times if isinstance(times, (list, pydicom.multival.MultiValue)) else [times])]
  if len(times) != num_phases:
    raise CaseError(f"{cid}: {len(times)} phase times in the SEG for {num_phases} phases")
  return times
