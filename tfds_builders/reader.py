"""The one reader every collection builder shares (DESIGN.md §3).

DICOM trees, DICOM SEG, NIfTI/NRRD/MHA in; SimpleITK images with their physical
geometry out; then a stored grid of a fixed size and the record dict.

Series and their roles are found from the DICOM headers only (SeriesInstanceUID,
Modality, ImageType, SeriesDescription, acquisition parameters): TCIA downloads name
folders differently from one release to the next and files arrive in any order.

Conventions: arrays are (z, y, x) = (slice, row, column); `Geometry` keeps the
SimpleITK (x, y, z) convention so that it can be applied to images unchanged;
`Geometry.spacing_zyx` gives the spacing in array order.
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from tfds_builders.records import CaseError


class DicomReadError(CaseError):
  """A DICOM file that cannot be read (truncated, corrupt); the message names the file."""


# ------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Geometry:
  """Physical placement of a 3D image, SimpleITK convention (x, y, z order)."""
  origin: tuple[float, float, float]
  spacing: tuple[float, float, float]
  direction: tuple[float, ...]  # 9 values, row-major, columns are the axis directions
  size: tuple[int, int, int]

  @classmethod
  def of(cls, image: sitk.Image) -> "Geometry":
    return cls(tuple(image.GetOrigin()), tuple(image.GetSpacing()),
               tuple(image.GetDirection()), tuple(int(s) for s in image.GetSize()))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Geometry":
    """From a record's `source_geometry` / `grid_geometry` entry."""
    return cls(tuple(float(v) for v in np.asarray(d["origin"])),
               tuple(float(v) for v in np.asarray(d["spacing"])),
               tuple(float(v) for v in np.asarray(d["direction"])),
               tuple(int(v) for v in np.asarray(d["size"])))

  def as_dict(self) -> dict[str, np.ndarray]:
    return {"origin": np.asarray(self.origin, np.float64),
            "spacing": np.asarray(self.spacing, np.float64),
            "direction": np.asarray(self.direction, np.float64),
            "size": np.asarray(self.size, np.int64)}

  @property
  def shape_zyx(self) -> tuple[int, int, int]:
    return tuple(reversed(self.size))

  @property
  def spacing_zyx(self) -> tuple[float, float, float]:
    return tuple(reversed(self.spacing))

  @property
  def matrix(self) -> np.ndarray:
    return np.asarray(self.direction, np.float64).reshape(3, 3)

  def image(self, array_zyx: np.ndarray) -> sitk.Image:
    """A SimpleITK image of `array_zyx` placed on this geometry."""
    array_zyx = np.asarray(array_zyx)
    if tuple(array_zyx.shape) != self.shape_zyx:
      raise ValueError(f"array of shape {array_zyx.shape} does not fit geometry of shape {self.shape_zyx}")
    image = sitk.GetImageFromArray(array_zyx)
    image.SetOrigin(self.origin)
    image.SetSpacing(self.spacing)
    image.SetDirection(self.direction)
    return image


def to_array(image: sitk.Image) -> np.ndarray:
  """(z, y, x) array of a 3D image."""
  return sitk.GetArrayFromImage(image)


def check_geometry(reference: Geometry, other: Geometry, what: str, *,
                   spacing_rtol: float = 1e-3, direction_atol: float = 1e-3,
                   origin_voxels: float = 0.5) -> None:
  """Raises CaseError unless `other` lies on the same voxel grid as `reference`.

  The origin may differ by less than half a voxel along each axis: within that,
  nearest-neighbour mapping of one grid onto the other is the identity.
  """
  if tuple(reference.size) != tuple(other.size):
    raise CaseError(f"{what}: size (x,y,z) {other.size} differs from the image's {reference.size}")
  ref_sp, sp = np.asarray(reference.spacing), np.asarray(other.spacing)
  if np.any(np.abs(sp - ref_sp) > spacing_rtol * ref_sp):
    raise CaseError(f"{what}: spacing (x,y,z) {tuple(np.round(sp, 4))} differs from the image's "
                    f"{tuple(np.round(ref_sp, 4))}")
  if np.any(np.abs(reference.matrix - other.matrix) > direction_atol):
    raise CaseError(f"{what}: direction {tuple(np.round(other.direction, 3))} differs from the image's "
                    f"{tuple(np.round(reference.direction, 3))}")
  # Origin offset expressed along the reference axes, in voxels.
  offset = reference.matrix.T @ (np.asarray(other.origin) - np.asarray(reference.origin)) / ref_sp
  if np.any(np.abs(offset) >= origin_voxels):
    raise CaseError(f"{what}: origin is {tuple(np.round(offset, 2))} voxels (x,y,z) away from the image's "
                    f"(tolerance {origin_voxels} voxel)")


# ------------------------------------------------------------------------------------
# Stored grid
# ------------------------------------------------------------------------------------
def grid_geometry(source: Geometry, shape_zyx: Sequence[int]) -> Geometry:
  """A grid of `shape_zyx` voxels covering the same physical box as `source`.

  The box is the voxels' outer faces (size x spacing), so a grid of the source's own
  size is the source grid itself.
  """
  size = np.asarray(list(reversed(shape_zyx)), np.int64)
  src_size, src_sp = np.asarray(source.size, np.float64), np.asarray(source.spacing)
  spacing = src_size * src_sp / size
  # Move the first voxel centre so that the outer faces coincide.
  origin = np.asarray(source.origin) + source.matrix @ ((spacing - src_sp) / 2)
  return Geometry(tuple(origin.tolist()), tuple(spacing.tolist()), tuple(source.direction),
                  tuple(int(s) for s in size))


def resample(image: sitk.Image, grid: Geometry, *, is_mask: bool) -> sitk.Image:
  """Resamples onto `grid`: linear for intensities, nearest neighbour for masks."""
  interpolator = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
  pixel = image.GetPixelID() if is_mask else sitk.sitkFloat32
  return sitk.Resample(image, [int(s) for s in grid.size], sitk.Transform(), interpolator,
                       grid.origin, grid.spacing, grid.direction, 0, pixel)


def resample_to_source(mask_zyx: np.ndarray, grid: Geometry, source: Geometry) -> np.ndarray:
  """Maps a mask on the stored grid back onto the original image (nearest), (z, y, x) uint8."""
  image = grid.image(np.asarray(mask_zyx, np.uint8))
  return to_array(resample(image, source, is_mask=True))


def grid_phases(phases: Sequence[sitk.Image], shape_zyx: Sequence[int], name: str
                ) -> tuple[np.ndarray, Geometry, Geometry]:
  """Every phase resampled onto the stored grid: ([T, S, H, W] float32, source, grid).

  The one preprocessing step that builders and `rst2g_jax.predict` share. All phases
  must lie on the first phase's grid and be finite (CaseError naming `name` otherwise).
  """
  if not phases:
    raise CaseError(f"{name}: no image phases")
  source = Geometry.of(phases[0])
  for index, phase in enumerate(phases[1:], start=1):
    check_geometry(source, Geometry.of(phase), f"{name}: phase {index}")
  # Checked before resampling, which clamps Inf and can spread or hide NaN.
  bad = [int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in map(to_array, phases)]
  if sum(bad):
    raise CaseError(f"{name}: image has {sum(bad)} NaN/Inf voxels (per phase {bad})")
  grid = grid_geometry(source, shape_zyx)
  image = np.stack([to_array(resample(p, grid, is_mask=False)) for p in phases]).astype(np.float32)
  return image, source, grid


def make_record(phases: Sequence[sitk.Image], mask: sitk.Image, shape_zyx: Sequence[int], *,
                case_id: str, patient_id: str, phase_times: Sequence[float], strata: int,
                collection: str) -> dict[str, Any]:
  """The record dict of one case (records.features): phases and mask on the stored grid.

  All phases and the mask must lie on the first phase's grid (CaseError otherwise);
  the first phase's geometry is kept as `source_geometry`.
  """
  image, source, grid = grid_phases(phases, shape_zyx, case_id)
  check_geometry(source, Geometry.of(mask), f"{case_id}: mask")
  mask = sitk.Image(mask)  # do not modify the caller's image
  mask.CopyInformation(phases[0])  # sub-voxel origin differences were accepted above
  return {
      "image": image,
      "mask": to_array(resample(mask, grid, is_mask=True)),
      "case_id": case_id,
      "patient_id": patient_id,
      "spacing": np.asarray(grid.spacing_zyx, np.float32),
      "phase_times": np.asarray(phase_times, np.float32),
      "strata": int(strata),
      "collection": collection,
      "source_geometry": source.as_dict(),
      "grid_geometry": grid.as_dict(),
  }


# ------------------------------------------------------------------------------------
# NIfTI / NRRD / MHA
# ------------------------------------------------------------------------------------
# `<id>_<phase>.<ext>`: MAMA-MIA's and nnU-Net's naming of one file per phase / channel.
PHASE_FILE_RE = re.compile(r"^(?P<id>.+)_(?P<phase>\d{4})\.(?:nii|nii\.gz|nrrd|mha)$", re.IGNORECASE)


def ordered_phase_files(numbered: dict[int, pathlib.Path], name: str, where: str | pathlib.Path
                        ) -> list[pathlib.Path]:
  """Phase files in phase order; CaseError when none is given or a phase number is missing."""
  if not numbered:
    raise CaseError(f"{name}: no phase files {name}_0000.nii.gz, ... in {where}")
  missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
  if missing:
    raise CaseError(f"{name}: phase file(s) {', '.join(f'_{p:04d}' for p in missing)} missing in "
                    f"{where} (found {', '.join(f'_{p:04d}' for p in sorted(numbered))})")
  return [numbered[p] for p in sorted(numbered)]


def read_image(path: str | pathlib.Path, *, is_mask: bool = False) -> sitk.Image:
  """A 3D NIfTI/NRRD/MHA file; float32 for images, uint8 for masks (labels kept as they are)."""
  path = pathlib.Path(path)
  try:
    image = sitk.ReadImage(str(path))
  except RuntimeError as e:
    raise CaseError(f"{path}: unreadable image file ({str(e).strip().splitlines()[-1][:200]})") from None
  if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
    raise CaseError(f"{path}: expected a 3D single-channel image, got {image.GetDimension()}D with "
                    f"{image.GetNumberOfComponentsPerPixel()} component(s)")
  if not is_mask:
    return sitk.Cast(image, sitk.sitkFloat32)
  values = to_array(image)
  if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or values.min() < 0 or values.max() > 255:
    raise CaseError(f"{path}: mask values must be integer labels in 0..255")
  out = sitk.GetImageFromArray(values.astype(np.uint8))
  out.CopyInformation(image)
  return out


# ------------------------------------------------------------------------------------
# DICOM scanning and series roles
# ------------------------------------------------------------------------------------
_MR_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"}  # MR, Enhanced MR
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "ImageType", "SeriesDescription", "SeriesNumber", "InstanceNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "TemporalPositionIdentifier",
    "TriggerTime", "AcquisitionTime", "SeriesTime", "ContrastBolusStartTime", "RepetitionTime",
    "EchoTime", "FlipAngle", "PatientID", "ClinicalTrialTimePointID", "StudyDate",
    "SpacingBetweenSlices", "SliceThickness", "NumberOfFrames",
]


def _seconds(tm: Any) -> float | None:
  """DICOM TM 'HHMMSS.frac' → seconds since midnight."""
  if tm in (None, ""):
    return None
  text = str(tm).strip()
  m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
  if not m:
    return None
  h, mi, s, frac = m.groups()
  return int(h) * 3600 + int(mi or 0) * 60 + int(s or 0) + float(frac or 0)


def _float(value: Any) -> float | None:
  try:
    return None if value in (None, "") else float(value)
  except (TypeError, ValueError):
    return None


@dataclasses.dataclass(frozen=True)
class DicomHeader:
  """The few header fields the reader needs from one DICOM file."""
  path: pathlib.Path
  sop_class: str
  study_uid: str
  series_uid: str
  modality: str
  image_type: tuple[str, ...]
  description: str
  series_number: int | None
  instance_number: int | None
  position: tuple[float, float, float] | None
  orientation: tuple[float, ...] | None
  pixel_spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x)
  rows: int | None
  columns: int | None
  temporal_position: int | None
  trigger_time: float | None          # ms
  acquisition_time: float | None      # s since midnight
  series_time: float | None
  bolus_start_time: float | None
  sequence: tuple                     # (TR, TE, flip angle) rounded: same for all phases of a DCE
  slice_spacing: float | None         # SpacingBetweenSlices, else SliceThickness (single slices only)
  patient_id: str
  time_point_id: str
  study_date: str

  @property
  def normal(self) -> np.ndarray:
    row, col = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
    return np.cross(row, col)

  @property
  def slice_position(self) -> float:
    """Position along the slice normal (mm)."""
    return float(np.dot(self.position, self.normal))


def read_header(path: pathlib.Path) -> DicomHeader | None:
  """The header of one file; None for a file that is not DICOM at all.

  Raises DicomReadError for a DICOM file whose header is cut short or corrupt.
  """
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
  except InvalidDicomError:
    return None  # no DICM prefix: a stray non-DICOM file (README, .txt, ...)
  except Exception as e:  # noqa: BLE001 -- pydicom raises many kinds on corrupt files
    raise DicomReadError(f"{path}: unreadable DICOM header ({type(e).__name__}: {e})") from None
  missing = [t for t in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID") if t not in ds]
  if missing:
    raise DicomReadError(f"{path}: DICOM header is truncated or corrupt (no {', '.join(missing)})")
  get = ds.get
  orientation = get("ImageOrientationPatient")
  position = get("ImagePositionPatient")
  spacing = get("PixelSpacing")
  number = lambda v: None if v in (None, "") else int(v)
  rnd = lambda v: None if _float(v) is None else round(_float(v), 2)
  return DicomHeader(
      path=pathlib.Path(path), sop_class=str(ds.SOPClassUID), study_uid=str(ds.StudyInstanceUID),
      series_uid=str(ds.SeriesInstanceUID), modality=str(get("Modality", "")).upper(),
      image_type=tuple(str(t).strip().upper() for t in (get("ImageType") or ())),
      description=str(get("SeriesDescription", "")), series_number=number(get("SeriesNumber")),
      instance_number=number(get("InstanceNumber")),
      position=None if position is None or len(position) != 3 else tuple(float(v) for v in position),
      orientation=None if orientation is None or len(orientation) != 6 else tuple(float(v) for v in orientation),
      pixel_spacing=None if spacing is None or len(spacing) != 2 else tuple(float(v) for v in spacing),
      rows=number(get("Rows")), columns=number(get("Columns")),
      temporal_position=number(get("TemporalPositionIdentifier")),
      trigger_time=_float(get("TriggerTime")), acquisition_time=_seconds(get("AcquisitionTime")),
      series_time=_seconds(get("SeriesTime")), bolus_start_time=_seconds(get("ContrastBolusStartTime")),
      sequence=(rnd(get("RepetitionTime")), rnd(get("EchoTime")), rnd(get("FlipAngle"))),
      slice_spacing=_float(get("SpacingBetweenSlices")) or _float(get("SliceThickness")),
      patient_id=str(get("PatientID", "")), time_point_id=str(get("ClinicalTrialTimePointID", "")).strip(),
      study_date=str(get("StudyDate", "")))


@dataclasses.dataclass
class DicomSeries:
  """All files of one SeriesInstanceUID, in no particular order."""
  uid: str
  headers: list[DicomHeader]

  @property
  def first(self) -> DicomHeader:
    return self.headers[0]

  @property
  def study_uid(self) -> str:
    return self.first.study_uid

  @property
  def is_seg(self) -> bool:
    return self.first.modality == "SEG" or self.first.sop_class == _SEG_SOP_CLASS

  @property
  def is_mr_image(self) -> bool:
    h = self.first
    return (h.sop_class in _MR_SOP_CLASSES or h.modality == "MR") and h.position is not None \
        and h.orientation is not None and h.pixel_spacing is not None

  @property
  def is_derived(self) -> bool:
    return bool(self.first.image_type) and self.first.image_type[0] == "DERIVED"


@dataclasses.dataclass
class ScanResult:
  """DICOM series found under a folder, and DICOM files whose header could not be read."""
  series: list[DicomSeries]
  unreadable: list[tuple[pathlib.Path, str]]

  def studies(self) -> dict[str, list[DicomSeries]]:
    """Series grouped by StudyInstanceUID (one exam each), in a stable order."""
    out: dict[str, list[DicomSeries]] = collections.defaultdict(list)
    for s in self.series:
      out[s.study_uid].append(s)
    return dict(out)


def scan_dicom(root: str | pathlib.Path) -> ScanResult:
  """Every DICOM file below `root` (any depth, any names), grouped by SeriesInstanceUID.

  Non-DICOM files are ignored; DICOM files with a cut-short header are listed in
  `unreadable` so that a builder can fail or skip the exam they belong to.
  """
  groups: dict[str, list[DicomHeader]] = collections.defaultdict(list)
  unreadable = []
  for path in sorted(p for p in pathlib.Path(root).rglob("*") if p.is_file()):
    try:
      header = read_header(path)
    except DicomReadError as e:
      unreadable.append((path, str(e)))
      continue
    if header is not None:
      groups[header.series_uid].append(header)
  series = [DicomSeries(uid, hs) for uid, hs in groups.items()]
  series.sort(key=lambda s: (s.study_uid, s.first.series_number or 0, s.uid))
  return ScanResult(series, unreadable)


_SER_RE = re.compile(r"\bSER\b|signal enhancement ratio", re.IGNORECASE)
_PE_RE = re.compile(r"\bPE\d*\b|percent enhancement|enhancement", re.IGNORECASE)
# For series not flagged DERIVED only explicit map names count ("contrast enhanced" is a DCE).
_MAP_NAME_RE = re.compile(r"\bSER\b|\bPE\d+\b|signal enhancement ratio|percent enhancement", re.IGNORECASE)


@dataclasses.dataclass
class SeriesRoles:
  """Roles of a study's series, from headers only."""
  dce: list[DicomSeries]          # one multi-phase series, or one series per phase
  ser: list[DicomSeries]          # signal-enhancement-ratio maps
  pe: list[DicomSeries]           # percent-enhancement maps
  seg: list[DicomSeries]          # DICOM SEG
  other: list[DicomSeries]


def _geometry_key(h: DicomHeader) -> tuple:
  """What all phases of one DCE acquisition share (not the slice positions)."""
  return (tuple(np.round(h.orientation, 3)), h.rows, h.columns, tuple(np.round(h.pixel_spacing, 4)),
          h.sequence)


def _position_key(h: DicomHeader) -> tuple:
  return tuple(np.round(h.position, 2))


def classify_series(series: Sequence[DicomSeries]) -> SeriesRoles:
  """Sorts a study's series into DCE / SER / PE / SEG / other from their headers.

  SEG: Modality SEG. Maps: derived MR images whose ImageType or SeriesDescription names
  SER or PE/enhancement (other derived series, e.g. subtractions, go to `other`), or any
  MR series explicitly named SER / PE<n> / "percent enhancement". DCE: among the other MR
  image series, the one with the most phases (files per distinct slice position), or the
  largest set of single-phase series sharing orientation, matrix, pixel spacing and
  sequence parameters (one series per phase). Empty `dce` when no series has several phases.
  """
  roles = SeriesRoles([], [], [], [], [])
  originals = []
  for s in series:
    words = " ".join(s.first.image_type[2:]) + " " + s.first.description
    if s.is_seg:
      roles.seg.append(s)
    elif s.is_mr_image and (s.is_derived or _MAP_NAME_RE.search(words)):
      if _SER_RE.search(words):
        roles.ser.append(s)
      elif _PE_RE.search(words):
        roles.pe.append(s)
      else:
        roles.other.append(s)
    elif s.is_mr_image:
      originals.append(s)
    else:
      roles.other.append(s)
  best, best_phases = [], 1.0
  by_geometry: dict[tuple, list[DicomSeries]] = collections.defaultdict(list)
  for s in originals:
    phases = len(s.headers) / len({_position_key(h) for h in s.headers})
    if phases > best_phases:
      best, best_phases = [s], phases
    elif phases == 1:
      by_geometry[_geometry_key(s.first)].append(s)
  for group in by_geometry.values():
    if len(group) > best_phases:
      best, best_phases = list(group), len(group)
  roles.dce = best
  roles.other.extend(s for s in originals if not any(s is d for d in roles.dce))
  return roles


# ------------------------------------------------------------------------------------
# DICOM series → phases → images
# ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Phase:
  """The files of one phase, sorted along the slice normal, and its time if the headers give it."""
  headers: list[DicomHeader]
  time: float | None  # seconds from contrast injection (ContrastBolusStartTime), else None


def _phase_time(headers: Sequence[DicomHeader]) -> float | None:
  h = headers[0]
  times = [x.acquisition_time for x in headers if x.acquisition_time is not None]
  if h.bolus_start_time is None or not times:
    return None
  return float(min(times) - h.bolus_start_time)


def _sorted_slices(headers: Iterable[DicomHeader]) -> list[DicomHeader]:
  return sorted(headers, key=lambda h: (h.slice_position, h.instance_number or 0))


def _checked_phase(headers: list[DicomHeader], positions: set, name: str, label: str) -> Phase:
  got = [_position_key(h) for h in headers]
  if len(got) != len(positions) or set(got) != positions:
    raise CaseError(f"{name}: {label} has {len(set(got))} slice positions ({len(got)} files), expected "
                    f"{len(positions)} (a phase is missing slices)")
  return Phase(_sorted_slices(headers), _phase_time(headers))


def split_phases(dce: Sequence[DicomSeries], name: str) -> list[Phase]:
  """The phases of a DCE acquisition, in acquisition order; CaseError naming `name` when one is incomplete.

  One series: by TemporalPositionIdentifier, else TriggerTime, else AcquisitionTime (when
  it groups whole volumes), else InstanceNumber blocks of one volume each (all phases in one
  series, as in Breast-MRI-NACT-Pilot), checked against the distinct slice positions.
  Several series: one phase each, ordered by the same tags, then SeriesTime and SeriesNumber.
  """
  if not dce:
    raise CaseError(f"{name}: no DCE image series")
  if len(dce) > 1:
    order = lambda s: tuple((v is None, v or 0) for v in (
        s.first.temporal_position, s.first.trigger_time,
        min((h.acquisition_time for h in s.headers if h.acquisition_time is not None), default=None),
        s.first.series_time, s.first.series_number))
    ordered = sorted(dce, key=order)
    positions = {_position_key(h) for h in ordered[0].headers}
    return [_checked_phase(s.headers, positions, name, f"phase {i} (series {s.first.series_number})")
            for i, s in enumerate(ordered)]
  headers = dce[0].headers
  positions = {_position_key(h) for h in headers}
  for field, must_group in (("temporal_position", True), ("trigger_time", True), ("acquisition_time", False)):
    values = [getattr(h, field) for h in headers]
    if any(v is None for v in values) or len(set(values)) < 2:
      continue
    groups = collections.defaultdict(list)
    for h, v in zip(headers, values):
      groups[v].append(h)
    whole = all(len(g) == len(positions) and {_position_key(h) for h in g} == positions
                for g in groups.values())
    if not whole and not must_group:
      continue  # e.g. per-slice acquisition times of a 2D sequence
    return [_checked_phase(groups[v], positions, name, f"phase {i} ({field}={v})")
            for i, v in enumerate(sorted(groups))]
  if len(headers) % len(positions):
    raise CaseError(f"{name}: {len(headers)} images do not make whole phases of {len(positions)} slice "
                    f"positions (a phase is missing slices)")
  n = len(positions)
  ordered = sorted(headers, key=lambda h: (h.instance_number is None, h.instance_number or 0))
  return [_checked_phase(ordered[i * n:(i + 1) * n], positions, name,
                         f"phase {i} (instances {i * n + 1}-{(i + 1) * n})")
          for i in range(len(headers) // n)]


def _read_pixels(path: pathlib.Path, name: str) -> tuple[np.ndarray, pydicom.Dataset]:
  try:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
  except Exception as e:  # noqa: BLE001 -- truncated data shows up as several exception types
    raise DicomReadError(f"{name}: {path}: unreadable DICOM pixel data, file truncated or corrupt "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
  return pixels, ds


def read_volume(headers: Sequence[DicomHeader], name: str) -> sitk.Image:
  """One 3D image (float32, RescaleSlope/Intercept applied) from the files of one phase.

  Slices are sorted along the normal of ImageOrientationPatient; the z spacing comes
  from the slice positions (not SliceThickness) and must be even.
  """
  headers = _sorted_slices(headers)
  first = headers[0]
  rows, cols = first.rows, first.columns
  volume = np.empty((len(headers), rows, cols), np.float32)
  for k, h in enumerate(headers):
    if (h.rows, h.columns) != (rows, cols) or h.orientation is None or \
        not np.allclose(h.orientation, first.orientation, atol=1e-3):
      raise CaseError(f"{name}: {h.path} has a different matrix or orientation from the rest of its phase")
    pixels, ds = _read_pixels(h.path, name)
    if pixels.shape != (rows, cols):
      raise CaseError(f"{name}: {h.path} pixel data of shape {pixels.shape}, expected {(rows, cols)}")
    slope, intercept = _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))
    volume[k] = pixels.astype(np.float32) * np.float32(1.0 if slope is None else slope) \
        + np.float32(0.0 if intercept is None else intercept)
  row, col = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
  normal = np.cross(row, col)
  if len(headers) > 1:
    steps = np.diff([h.slice_position for h in headers])
    z = float(np.mean(steps))
    if z <= 1e-3 or np.max(np.abs(steps - z)) > max(0.01, 0.01 * z):
      raise CaseError(f"{name}: uneven or repeated slice positions (steps {np.round(steps.min(), 3)} to "
                      f"{np.round(steps.max(), 3)} mm)")
  else:
    z = first.slice_spacing or 1.0
  direction = np.stack([row, col, normal], axis=1)  # columns: x, y, z axes
  geometry = Geometry(first.position, (first.pixel_spacing[1], first.pixel_spacing[0], z),
                      tuple(direction.ravel().tolist()), (cols, rows, len(headers)))
  return geometry.image(volume)


def read_dicom_phases(dce: Sequence[DicomSeries], name: str) -> tuple[list[sitk.Image], list[float | None]]:
  """Images and times (s from injection, None if unknown) of every phase of a DCE acquisition."""
  phases = split_phases(dce, name)
  return [read_volume(p.headers, name) for p in phases], [p.time for p in phases]


# ------------------------------------------------------------------------------------
# DICOM SEG
# ------------------------------------------------------------------------------------
def _seq_item(item: pydicom.Dataset, shared: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
  for source in (item, shared):
    if source is not None and keyword in source and len(source[keyword].value):
      return source[keyword].value[0]
  return None


def read_seg(path: str | pathlib.Path, reference: sitk.Image, name: str, *,
             segments: Sequence[int] | None = None) -> np.ndarray:
  """A DICOM SEG placed on `reference`'s voxel grid: (z, y, x) uint8 in {0, 1}.

  Each frame goes onto the slice whose position along the slice normal matches its
  per-frame ImagePositionPatient (within a quarter of the slice spacing); an in-plane
  origin offset is rounded to whole pixels (TCIA SEGs are often a fraction of a pixel
  off). FRACTIONAL values count as inside from half of MaximumFractionalValue. Frames of
  several segments are united (or only `segments`).
  """
  path = pathlib.Path(path)
  pixels, ds = _read_pixels(path, name)
  n_frames = int(ds.get("NumberOfFrames", 1))
  pixels = pixels.reshape(n_frames, int(ds.Rows), int(ds.Columns))
  if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
    inside = pixels >= max(1, int(ds.get("MaximumFractionalValue", 255)) / 2)
  else:
    inside = pixels > 0
  geometry = Geometry.of(reference)
  matrix, spacing = geometry.matrix, np.asarray(geometry.spacing)
  shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
  if "PerFrameFunctionalGroupsSequence" not in ds:
    raise CaseError(f"{name}: {path} has no per-frame functional groups (frame positions unknown)")
  out = np.zeros(geometry.shape_zyx, np.uint8)
  for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
    seg_id = _seq_item(item, shared, "SegmentIdentificationSequence")
    if segments is not None and (seg_id is None or int(seg_id.ReferencedSegmentNumber) not in segments):
      continue
    plane = _seq_item(item, shared, "PlanePositionSequence")
    orient = _seq_item(item, shared, "PlaneOrientationSequence")
    measures = _seq_item(item, shared, "PixelMeasuresSequence")
    if plane is None or orient is None or measures is None:
      raise CaseError(f"{name}: {path} frame {index + 1} lacks its position, orientation or pixel spacing")
    o = np.asarray(orient.ImageOrientationPatient, np.float64)
    if abs(np.dot(o[:3], matrix[:, 0])) < 0.999 or abs(np.dot(o[3:], matrix[:, 1])) < 0.999:
      raise CaseError(f"{name}: {path} frame {index + 1} orientation {tuple(o)} differs from the image's")
    px = np.asarray(measures.PixelSpacing, np.float64)
    if np.any(np.abs(px[::-1] - spacing[:2]) > 1e-3 * spacing[:2]):
      raise CaseError(f"{name}: {path} pixel spacing {tuple(px)} differs from the image's "
                      f"{tuple(spacing[1::-1])}")
    flip_x, flip_y = np.dot(o[:3], matrix[:, 0]) < 0, np.dot(o[3:], matrix[:, 1]) < 0
    frame = inside[index][::-1 if flip_y else 1, ::-1 if flip_x else 1]
    offset = matrix.T @ (np.asarray(plane.ImagePositionPatient, np.float64) - np.asarray(geometry.origin))
    ijk = offset / spacing
    # A flipped frame's first pixel is the image's last along that axis.
    i0 = int(round(ijk[0] - (frame.shape[1] - 1 if flip_x else 0)))
    j0 = int(round(ijk[1] - (frame.shape[0] - 1 if flip_y else 0)))
    k = int(round(ijk[2]))
    if abs(ijk[2] - k) > 0.25 or not 0 <= k < out.shape[0]:
      raise CaseError(f"{name}: {path} frame {index + 1} lies {offset[2]:.2f} mm along the slice normal, "
                      f"on no image slice")
    ys, xs = slice(max(j0, 0), min(j0 + frame.shape[0], out.shape[1])), \
        slice(max(i0, 0), min(i0 + frame.shape[1], out.shape[2]))
    if ys.start < ys.stop and xs.start < xs.stop:
      out[k, ys, xs] |= frame[ys.start - j0:ys.stop - j0, xs.start - i0:xs.stop - i0]
  return out


def private_value(ds: pydicom.Dataset, group: int, creator: str, element: int) -> Any:
  """A private tag's value found through its private creator; None when absent."""
  try:
    return ds.private_block(group, creator)[element].value
  except KeyError:
    return None


# ------------------------------------------------------------------------------------
# Additions for the TCGA-BRCA, MAMA-MIA and external-set builders
# ------------------------------------------------------------------------------------
def find_child(folder: str | pathlib.Path, name: str, what: str) -> pathlib.Path | None:
  """The entry of `folder` named `name`, compared case-insensitively; None when absent.

  File-name case differs between releases of the same collection (MAMA-MIA), so an exact
  match is preferred and any other spelling accepted; two spellings at once are ambiguous.
  """
  folder = pathlib.Path(folder)
  exact = folder / name
  if exact.exists():
    return exact
  if not folder.is_dir():
    return None
  found = sorted(p for p in folder.iterdir() if p.name.lower() == name.lower())
  if len(found) > 1:
    raise CaseError(f"{what}: {folder} holds {', '.join(p.name for p in found)}; expected one {name}")
  return found[0] if found else None


def single_phase(headers: Sequence[DicomHeader], name: str) -> Phase:
  """The files of a series known (e.g. from a series key) to hold exactly one volume.

  Sorted along the slice normal; two files at one slice position mean the series holds
  more than one volume, which is a CaseError naming `name`.
  """
  positions = collections.Counter(_position_key(h) for h in headers)
  if len(positions) != len(headers):
    raise CaseError(f"{name}: series {headers[0].series_number} has {len(headers)} images at "
                    f"{len(positions)} slice positions, expected one volume")
  return Phase(_sorted_slices(headers), _phase_time(headers))


@dataclasses.dataclass(frozen=True)
class LesionFile:
  """A TCGA-Breast-Radiogenomics lesion file: an inclusive voxel box and the voxels inside it.

  `start` / `end` are (z, y, x) indices into the annotated DICOM series (inclusive); `voxels`
  is the box's binary mask, (z, y, x).
  """
  path: pathlib.Path
  start: tuple[int, int, int]
  end: tuple[int, int, int]
  voxels: np.ndarray


def read_lesion_file(path: str | pathlib.Path, name: str) -> LesionFile:
  """Reads a `.les` lesion file: six little-endian uint16 (y0, x0, z0, y1, x1, z1), then int8 voxels.

  The voxels fill the inclusive box in (y, x, z) order, z fastest. This layout is the one
  public parsers of the files use (TCIA's own description was not available to check); a
  file whose size disagrees with its box is a CaseError naming it.
  """
  path = pathlib.Path(path)
  data = path.read_bytes()
  if len(data) < 12:
    raise CaseError(f"{name}: lesion file {path} has {len(data)} bytes, shorter than its 12-byte box header")
  y0, x0, z0, y1, x1, z1 = (int(v) for v in np.frombuffer(data[:12], "<u2"))
  shape = (y1 - y0 + 1, x1 - x0 + 1, z1 - z0 + 1)
  if min(shape) < 1:
    raise CaseError(f"{name}: lesion file {path} has an empty box y {y0}-{y1}, x {x0}-{x1}, z {z0}-{z1}")
  count = int(np.prod(shape))
  if len(data) - 12 != count:
    raise CaseError(f"{name}: lesion file {path} holds {len(data) - 12} voxels, its box "
                    f"y {y0}-{y1}, x {x0}-{x1}, z {z0}-{z1} needs {count} (file truncated or not a lesion file)")
  voxels = np.frombuffer(data[12:], np.int8).reshape(shape).transpose(2, 0, 1)
  return LesionFile(path, (z0, y0, x0), (z1, y1, x1), (voxels != 0).astype(np.uint8))
