"""Writes small but realistic DICOM studies for tests (MR series, SER maps, DICOM SEG).

The tags are those real exams carry (SOP classes, UIDs, positions, orientation, pixel
spacing, rescale, sequence parameters); folders and file names are deliberately
misleading and files are written in shuffled order, because the reader must rely on
headers only. Reusable by every collection's tests.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
UCSF_CREATOR = "UCSF BIRP PRIVATE CREATOR 011710xx"


@dataclasses.dataclass(frozen=True)
class Grid:
  """Slice geometry of a test volume: (z, y, x) shape and spacing, DICOM orientation."""
  shape: tuple[int, int, int] = (6, 12, 10)
  spacing: tuple[float, float, float] = (3.0, 1.5, 1.25)  # (z, y, x) mm
  origin: tuple[float, float, float] = (-20.0, 10.0, 35.0)
  orientation: tuple[float, ...] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal, as NACT-Pilot

  @property
  def normal(self) -> np.ndarray:
    o = np.asarray(self.orientation)
    return np.cross(o[:3], o[3:])

  def position(self, k: int) -> np.ndarray:
    return np.asarray(self.origin) + k * self.spacing[0] * self.normal

  @property
  def direction(self) -> tuple[float, ...]:
    """SimpleITK direction (columns x, y, z axes)."""
    o = np.asarray(self.orientation)
    return tuple(np.stack([o[:3], o[3:], self.normal], axis=1).ravel().tolist())


@dataclasses.dataclass
class Study:
  """UIDs and ids shared by every series of one exam."""
  patient_id: str = "TEST-01"
  time_point: str = "T1"
  study_uid: str = dataclasses.field(default_factory=generate_uid)
  frame_uid: str = dataclasses.field(default_factory=generate_uid)
  study_date: str = "20200101"


def _ds(values: Sequence[float]) -> list[str]:
  return [f"{v:.6f}"[:16] for v in values]


def _base(study: Study, sop_class: str, series_uid: str) -> Dataset:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID = study.study_uid
  ds.SeriesInstanceUID = series_uid
  ds.FrameOfReferenceUID = study.frame_uid
  ds.PatientName = "Test^Anonymous"
  ds.PatientID = study.patient_id
  ds.ClinicalTrialTimePointID = study.time_point
  ds.StudyDate = study.study_date
  ds.StudyTime = "101500"
  return ds


def _write(ds: Dataset, folder: pathlib.Path, rng: np.random.Generator) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{rng.integers(1 << 40):010x}.dcm"  # names say nothing
  ds.save_as(path, enforce_file_format=True)
  return path


def mr_slice(study: Study, grid: Grid, series_uid: str, k: int, pixels: np.ndarray, *,
             rescale=(1.0, 0.0), image_type=("ORIGINAL", "PRIMARY", "OTHER"), description="Sag 3D FGRE",
             series_number=2, instance_number=1, sequence=(8.2, 4.2, 20.0), **tags) -> Dataset:
  """One MR image slice; `pixels` are the intended values, stored through `rescale`."""
  ds = _base(study, MR_STORAGE, series_uid)
  ds.Modality = "MR"
  ds.ImageType = list(image_type)
  ds.SeriesDescription = description
  ds.SeriesNumber = series_number
  ds.InstanceNumber = instance_number
  ds.ImagePositionPatient = _ds(grid.position(k))
  ds.ImageOrientationPatient = _ds(grid.orientation)
  ds.PixelSpacing = _ds(grid.spacing[1:])
  ds.SliceThickness = f"{grid.spacing[0]:g}"
  ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = (f"{v:g}" for v in sequence)
  slope, intercept = rescale
  ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
  stored = np.round((np.asarray(pixels, np.float64) - intercept) / slope).astype(np.int16)
  ds.Rows, ds.Columns = stored.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  ds.PixelData = stored.tobytes()
  for key, value in tags.items():
    setattr(ds, key, value)
  return ds


def write_dce(root: pathlib.Path, study: Study, grid: Grid, phases: np.ndarray, *, layout: str,
              rescale=(2.0, -100.0), seed: int = 0, folders=("pe_map", "seg", "notes"),
              description: str = "Sag 3D FGRE") -> list[pathlib.Path]:
  """A DCE acquisition `phases` [T, z, y, x] in one of the layouts real exams use.

  layout: "series_per_phase" (one series per phase, AcquisitionTime per series),
  "temporal_position" (TemporalPositionIdentifier), "trigger_time" (TriggerTime only),
  "acquisition_time" (one AcquisitionTime per phase), "instance_blocks" (all phases in one
  series, InstanceNumber blocks, no time tags: Breast-MRI-NACT-Pilot),
  "instance_blocks_slice_times" (blocks, and a different AcquisitionTime on every slice).
  Files are spread over misleadingly named folders in shuffled order.
  """
  rng = np.random.default_rng(seed)
  one_uid = generate_uid()
  slices = []
  n = grid.shape[0]
  for p, volume in enumerate(phases):
    series_uid = generate_uid() if layout == "series_per_phase" else one_uid
    for k in range(n):
      tags = {}
      if layout == "series_per_phase":
        tags = {"AcquisitionTime": f"1020{p:02d}", "SeriesTime": f"1020{p:02d}"}
      elif layout == "temporal_position":
        tags = {"TemporalPositionIdentifier": p + 1, "NumberOfTemporalPositions": len(phases)}
      elif layout == "trigger_time":
        tags = {"TriggerTime": f"{p * 90000:g}"}
      elif layout == "acquisition_time":
        tags = {"AcquisitionTime": f"10{20 + p:02d}00.5"}
      elif layout == "instance_blocks_slice_times":  # a 2D sequence: every slice its own time
        tags = {"AcquisitionTime": f"10{20 + p:02d}{k:02d}"}
      elif layout != "instance_blocks":
        raise ValueError(layout)
      # Instance numbers: sequential in the blocks layouts, scrambled otherwise.
      blocks = layout.startswith("instance_blocks")
      number = p * n + k + 1 if blocks else int(rng.integers(1, 10_000))
      slices.append(mr_slice(study, grid, series_uid, k, volume[k], rescale=rescale, description=description,
                             series_number=2 + (p if layout == "series_per_phase" else 0),
                             instance_number=number, **tags))
  paths = []
  for i in rng.permutation(len(slices)):
    paths.append(_write(slices[i], root / folders[int(rng.integers(len(folders)))], rng))
  return paths


def write_volume(root: pathlib.Path, study: Study, grid: Grid, volume: np.ndarray, *, folder: str,
                 seed: int = 1, **slice_tags) -> list[pathlib.Path]:
  """One single-phase MR series (e.g. a T2 or a map), files shuffled; tags go to `mr_slice`."""
  rng = np.random.default_rng(seed)
  uid = generate_uid()
  paths = []
  for k in rng.permutation(grid.shape[0]):
    ds = mr_slice(study, grid, uid, int(k), volume[k], instance_number=int(k) + 1, **slice_tags)
    paths.append(_write(ds, root / folder, rng))
  return paths


def write_map(root: pathlib.Path, study: Study, grid: Grid, volume: np.ndarray, *, kind: str = "SER",
              rescale=(0.001, 0.0), seed: int = 1, folder: str = "dce") -> list[pathlib.Path]:
  """A derived parametric map (SER / PE1) on the DCE grid, as the UCSF software writes it."""
  return write_volume(root, study, grid, volume, folder=folder, seed=seed, rescale=rescale,
                      image_type=("DERIVED", "PRIMARY", "DCE", kind), description=f"Sag 3D FGRE: {kind}",
                      series_number=21000)


def write_seg(path: pathlib.Path, study: Study, grid: Grid, mask: np.ndarray, *, fractional: bool = True,
              inplane_offset_px=(0.0, 0.0), phase_times: Sequence[float] | None = None,
              num_phases: int | None = None, seed: int = 2) -> pathlib.Path:
  """A DICOM SEG of `mask` [z, y, x], one frame per slice that holds any voxel, frames shuffled.

  `inplane_offset_px` shifts the frames' in-plane origin by (column, row) pixels, as some
  TCIA SEGs are a fraction of a pixel off; `phase_times` / `num_phases` go into the
  UCSF private block the way Breast-MRI-NACT-Pilot SEGs carry them.
  """
  rng = np.random.default_rng(seed)
  ds = _base(study, SEG_STORAGE, generate_uid())
  ds.Modality = "SEG"
  ds.ImageType = ["DERIVED", "PRIMARY"]
  ds.SeriesDescription = "VOI Breast Tissue Segmentation"
  ds.SeriesNumber = 22101
  ds.InstanceNumber = 1
  ks = [k for k in range(mask.shape[0]) if mask[k].any()]
  ks = [ks[i] for i in rng.permutation(len(ks))]
  o = np.asarray(grid.orientation)
  shift = inplane_offset_px[0] * grid.spacing[2] * o[:3] + inplane_offset_px[1] * grid.spacing[1] * o[3:]
  shared = Dataset()
  orient, measures = Dataset(), Dataset()
  orient.ImageOrientationPatient = _ds(grid.orientation)
  measures.PixelSpacing = _ds(grid.spacing[1:])
  measures.SliceThickness = f"{grid.spacing[0]:g}"
  shared.PlaneOrientationSequence = [orient]
  shared.PixelMeasuresSequence = [measures]
  ds.SharedFunctionalGroupsSequence = [shared]
  frames = []
  for k in ks:
    item, plane, seg_id = Dataset(), Dataset(), Dataset()
    plane.ImagePositionPatient = _ds(grid.position(k) + shift)
    seg_id.ReferencedSegmentNumber = 1
    item.PlanePositionSequence = [plane]
    item.SegmentIdentificationSequence = [seg_id]
    frames.append(item)
  ds.PerFrameFunctionalGroupsSequence = frames
  segment = Dataset()
  segment.SegmentNumber = 1
  segment.SegmentLabel = "Breast"
  ds.SegmentSequence = [segment]
  ds.NumberOfFrames = len(ks)
  ds.Rows, ds.Columns = mask.shape[1:]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.PixelRepresentation = 0
  data = np.stack([mask[k] for k in ks]).astype(np.uint8)
  if fractional:
    ds.SegmentationType = "FRACTIONAL"
    ds.SegmentationFractionalType = "OCCUPANCY"
    ds.MaximumFractionalValue = 255
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (data * 255).astype(np.uint8).tobytes()
  else:
    ds.SegmentationType = "BINARY"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = pydicom.pixels.pack_bits(data.ravel())
  if phase_times is not None or num_phases is not None:
    block = ds.private_block(0x0117, UCSF_CREATOR, create=True)
    if num_phases is not None:
      block.add_new(0x30, "IS", str(num_phases))
    if phase_times is not None:
      block.add_new(0x34, "DS", [f"{t:g}" for t in phase_times])
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path


def smooth_volume(shape, rng: np.random.Generator, scale: float = 400.0) -> np.ndarray:
  """A smooth positive test volume (values a scanner could give)."""
  z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
  phase = rng.uniform(0, 2 * np.pi, 3)
  return scale * (1.5 + np.sin(3 * z + phase[0]) * np.cos(4 * y + phase[1]) * np.sin(5 * x + phase[2]))


def write_nact_exam(root: pathlib.Path, *, patient_id: str = "UCSF-BR-99", time_point: str = "T1",
                    grid: Grid = Grid(), seed: int = 0, num_recorded_phases: int = 3):
  """A small exam laid out like Breast-MRI-NACT-Pilot: DCE (3 phases, one series), SER, VOI SEG.

  Returns (phases [3, z, y, x], ftv_mask [z, y, x], paths by role).
  """
  rng = np.random.default_rng(seed)
  study = Study(patient_id=patient_id, time_point=time_point)
  pre = smooth_volume(grid.shape, rng)
  zz, yy, xx = np.indices(grid.shape)
  c = np.asarray(grid.shape) / 2
  tumor = ((zz - c[0]) / 2.0) ** 2 + ((yy - c[1]) / 3.5) ** 2 + ((xx - c[2]) / 3.0) ** 2 <= 1.0
  phases = np.stack([pre, pre * (1 + 0.9 * tumor + 0.2), pre * (1 + 0.6 * tumor + 0.3)])
  ser = np.where(tumor, 1.3, 0.0) + np.where(rng.random(grid.shape) < 0.2, 0.5, 0.0)
  voi = np.zeros(grid.shape, np.uint8)
  voi[1:-1, 2:-2, 2:-2] = 1
  paths = {
      "dce": write_dce(root, study, grid, phases, layout="instance_blocks", seed=seed,
                       folders=("ser_map",)),
      "ser": write_map(root, study, grid, ser, seed=seed + 1, folder="dce_orig"),
      "seg": [write_seg(root / "x" / "1-1.dcm", study, grid, voi, inplane_offset_px=(0.3, -0.2),
                        phase_times=(-200, 150, 450), num_phases=num_recorded_phases, seed=seed + 2)],
  }
  ftv = (voi.astype(bool) & (ser > 0)).astype(np.uint8)
  return phases, ftv, paths


def _tm(seconds: float) -> str:
  """Seconds since midnight as DICOM TM HHMMSS."""
  s = int(round(seconds))
  return f"{s // 3600:02d}{s % 3600 // 60:02d}{s % 60:02d}"


def write_multivolume(root: pathlib.Path, study: Study, grid: Grid, phases: np.ndarray, *, series_number: int,
                      first_trigger_ms: float = 0.0, phase_step_s: float = 90.0, bolus_lead_s: float | None = None,
                      instances_against_normal: bool = True, seed: int = 0, folder: str = "multivolume",
                      description: str = "Ax Vibrant MultiPhase") -> list[pathlib.Path]:
  """All `phases` [T, z, y, x] in ONE series, told apart by TriggerTime (GE multi-phase, TCGA-BRCA).

  InstanceNumber counts images phase after phase; within a phase it runs against the slice
  normal when `instances_against_normal` (so instance order and position order differ).
  With `bolus_lead_s`, ContrastBolusStartTime lies that many seconds before phase 0 and each
  phase's AcquisitionTime is `phase_step_s` after the previous one.
  """
  rng = np.random.default_rng(seed)
  uid = generate_uid()
  n = grid.shape[0]
  start = 10 * 3600 + 20 * 60
  slices = []
  for p, volume in enumerate(phases):
    for k in range(n):
      rank = n - 1 - k if instances_against_normal else k
      tags = {"TriggerTime": f"{first_trigger_ms + p * phase_step_s * 1000:g}"}
      if bolus_lead_s is not None:
        tags.update(AcquisitionTime=_tm(start + p * phase_step_s), ContrastBolusStartTime=_tm(start - bolus_lead_s))
      slices.append(mr_slice(study, grid, uid, k, volume[k], description=description, series_number=series_number,
                             instance_number=p * n + rank + 1, **tags))
  return [_write(slices[i], root / folder, rng) for i in rng.permutation(len(slices))]


def write_lesion_file(path: pathlib.Path, start_zyx: Sequence[int], voxels_zyx: np.ndarray) -> pathlib.Path:
  """A TCGA-Breast-Radiogenomics `.les` file: uint16 box (y0, x0, z0, y1, x1, z1), int8 voxels in (y, x, z) order."""
  voxels_zyx = np.asarray(voxels_zyx)
  z0, y0, x0 = start_zyx
  z1, y1, x1 = (s + d - 1 for s, d in zip(start_zyx, voxels_zyx.shape))
  header = np.asarray([y0, x0, z0, y1, x1, z1], "<u2").tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(header + voxels_zyx.transpose(1, 2, 0).astype(np.int8).tobytes())
  return path
