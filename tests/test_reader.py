"""The shared reader on small studies written here: DICOM layouts, SEG, NIfTI/NRRD, grids."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests import dicom_factory as factory
from tfds_builders import reader
from tfds_builders.records import CaseError

LAYOUTS = ["series_per_phase", "temporal_position", "trigger_time", "acquisition_time", "instance_blocks",
           "instance_blocks_slice_times"]


def _phases(grid, seed=0, n=3):
  rng = np.random.default_rng(seed)
  pre = factory.smooth_volume(grid.shape, rng)
  return np.stack([pre + 150.0 * p for p in range(n)])  # distinct phases reveal a wrong order


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dicom_layouts_give_phases_in_order_with_geometry(tmp_path, layout):
  grid = factory.Grid(orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))  # coronal: normal along +y
  study = factory.Study()
  phases = _phases(grid)
  factory.write_dce(tmp_path, study, grid, phases, layout=layout, folders=("ser", "t2", "mask"),
                    description="Sag VIBRANT contrast enhanced")  # "enhanced" does not make it a map
  # Distractors: a T2 series on the same grid (other sequence), a SER map, a stray text file.
  factory.write_volume(tmp_path, study, grid, phases[0], folder="dce", sequence=(4000.0, 90.0, 90.0),
                       description="Sag T2 FSE", series_number=9)
  factory.write_map(tmp_path, study, grid, np.ones(grid.shape), folder="phase1")
  (tmp_path / "ser" / "README.txt").write_text("not DICOM")

  scan = reader.scan_dicom(tmp_path)
  assert scan.unreadable == [] and len(scan.studies()) == 1
  roles = reader.classify_series(scan.series)
  assert len(roles.ser) == 1 and roles.seg == []
  assert len(roles.dce) == (3 if layout == "series_per_phase" else 1)
  assert all("T2" not in s.first.description for s in roles.dce)
  images, times = reader.read_dicom_phases(roles.dce, "study")
  got = np.stack([reader.to_array(i) for i in images])
  assert got.shape == phases.shape
  np.testing.assert_allclose(got, phases, atol=1.0)  # stored through RescaleSlope 2, Intercept -100
  geometry = reader.Geometry.of(images[0])
  np.testing.assert_allclose(geometry.spacing_zyx, grid.spacing, rtol=1e-6)
  np.testing.assert_allclose(geometry.origin, grid.origin, atol=1e-4)
  np.testing.assert_allclose(geometry.direction, grid.direction, atol=1e-6)
  assert times == [None, None, None]


def test_phase_times_from_contrast_bolus_start(tmp_path):
  grid, study = factory.Grid(), factory.Study()
  phases = _phases(grid)
  paths = factory.write_dce(tmp_path, study, grid, phases, layout="series_per_phase")
  for p in paths:  # injection at 10:19:30; phase p acquired at 10:20:0p
    ds = pydicom.dcmread(p)
    ds.ContrastBolusStartTime = "101930"
    ds.save_as(p)
  roles = reader.classify_series(reader.scan_dicom(tmp_path).series)
  _, times = reader.read_dicom_phases(roles.dce, "study")
  assert times == [30.0, 31.0, 32.0]


def test_instance_blocks_with_a_missing_slice_is_a_case_error(tmp_path):
  grid, study = factory.Grid(), factory.Study()
  paths = factory.write_dce(tmp_path, study, grid, _phases(grid), layout="instance_blocks")
  paths[5].unlink()
  roles = reader.classify_series(reader.scan_dicom(tmp_path).series)
  with pytest.raises(CaseError, match=r"^exam-7: 17 images do not make whole phases of 6 slice positions"):
    reader.read_dicom_phases(roles.dce, "exam-7")


def test_temporal_position_phase_with_fewer_slices_is_a_case_error(tmp_path):
  grid, study = factory.Grid(), factory.Study()
  paths = factory.write_dce(tmp_path, study, grid, _phases(grid), layout="temporal_position")
  victim = next(p for p in paths if int(pydicom.dcmread(p).TemporalPositionIdentifier) == 2)
  victim.unlink()
  roles = reader.classify_series(reader.scan_dicom(tmp_path).series)
  with pytest.raises(CaseError, match=r"exam-8: phase 1 \(temporal_position=2\) has 5 slice positions"):
    reader.read_dicom_phases(roles.dce, "exam-8")


def test_truncated_pixel_data_names_the_file(tmp_path):
  grid, study = factory.Grid(), factory.Study()
  paths = factory.write_dce(tmp_path, study, grid, _phases(grid), layout="instance_blocks")
  data = paths[3].read_bytes()
  paths[3].write_bytes(data[:-100])
  roles = reader.classify_series(reader.scan_dicom(tmp_path).series)
  with pytest.raises(reader.DicomReadError, match=str(paths[3])) as e:
    reader.read_dicom_phases(roles.dce, "exam")
  assert "\n" not in str(e.value) and "truncated" in str(e.value)


def test_truncated_header_is_listed_not_skipped(tmp_path):
  grid, study = factory.Grid(), factory.Study()
  paths = factory.write_dce(tmp_path, study, grid, _phases(grid), layout="instance_blocks")
  paths[0].write_bytes(paths[0].read_bytes()[:600])
  scan = reader.scan_dicom(tmp_path)
  assert [p for p, _ in scan.unreadable] == [paths[0]]
  assert "truncated" in scan.unreadable[0][1]


@pytest.mark.parametrize("fractional", [True, False])
def test_seg_frames_placed_by_position_along_normal(tmp_path, fractional):
  grid, study = factory.Grid(), factory.Study()
  factory.write_dce(tmp_path / "img", study, grid, _phases(grid)[:1], layout="instance_blocks")
  mask = np.zeros(grid.shape, np.uint8)
  mask[1, 3:7, 2:5] = 1
  mask[4, 5:11, 4:9] = 1  # slices 0, 2, 3, 5 have no frame
  seg = factory.write_seg(tmp_path / "s.dcm", study, grid, mask, fractional=fractional,
                          inplane_offset_px=(0.3, -0.4))
  roles = reader.classify_series(reader.scan_dicom(tmp_path / "img").series)
  image = reader.read_volume(roles.other[0].headers, "exam")
  np.testing.assert_array_equal(reader.read_seg(seg, image, "exam"), mask)


def test_seg_frame_between_slices_is_a_case_error(tmp_path):
  grid, study = factory.Grid(), factory.Study()
  factory.write_dce(tmp_path / "img", study, grid, _phases(grid)[:1], layout="instance_blocks")
  mask = np.zeros(grid.shape, np.uint8)
  mask[2, 3:7, 2:5] = 1
  half = factory.Grid(origin=tuple(np.asarray(grid.origin) + 0.5 * grid.spacing[0] * grid.normal))
  seg = factory.write_seg(tmp_path / "s.dcm", study, half, mask)
  roles = reader.classify_series(reader.scan_dicom(tmp_path / "img").series)
  image = reader.read_volume(roles.other[0].headers, "exam")
  with pytest.raises(CaseError, match="exam: .* on no image slice"):
    reader.read_seg(seg, image, "exam")


def _sitk(array, spacing_zyx=(2.5, 0.8, 0.8), origin=(5.0, -3.0, 12.0)):
  image = sitk.GetImageFromArray(array)
  image.SetSpacing(tuple(reversed(spacing_zyx)))
  image.SetOrigin(origin)
  image.SetDirection((0, 0, -1, 1, 0, 0, 0, -1, 0))
  return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_record_round_trip_from_files(tmp_path, suffix):
  rng = np.random.default_rng(3)
  shape = (5, 9, 7)
  phases = rng.uniform(0, 1000, (2, *shape)).astype(np.float32)
  mask = (rng.random(shape) < 0.3).astype(np.uint8)
  for p in range(2):
    sitk.WriteImage(_sitk(phases[p]), str(tmp_path / f"phase{p}{suffix}"))
  sitk.WriteImage(_sitk(mask), str(tmp_path / f"mask{suffix}"))
  images = [reader.read_image(tmp_path / f"phase{p}{suffix}") for p in range(2)]
  record = reader.make_record(images, reader.read_image(tmp_path / f"mask{suffix}", is_mask=True), shape,
                              case_id="c1", patient_id="p1", phase_times=[-1, 90], strata=1,
                              collection="test")
  np.testing.assert_allclose(record["image"], phases, rtol=1e-6)  # same-size grid is the source grid
  np.testing.assert_array_equal(record["mask"], mask)
  np.testing.assert_allclose(record["spacing"], (2.5, 0.8, 0.8), rtol=1e-6)
  source = reader.Geometry.from_dict(record["source_geometry"])
  expected = reader.Geometry.of(_sitk(mask))
  assert source.size == expected.size
  for field in ("origin", "spacing", "direction"):  # NIfTI keeps float32
    np.testing.assert_allclose(getattr(source, field), getattr(expected, field), atol=1e-5)
  np.testing.assert_allclose(record["grid_geometry"]["origin"], source.origin, atol=1e-9)


def test_resampling_keeps_tumor_volume_and_maps_back():
  source_shape, spacing = (24, 70, 64), (2.5, 0.8, 0.7)
  z, y, x = np.indices(source_shape) * np.asarray(spacing)[:, None, None, None]
  centre = np.asarray(source_shape) * spacing / 2
  sphere = (((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((x - centre[2]) / 1.3) ** 2) <= 12.0 ** 2)
  mask = sphere.astype(np.uint8)
  phases = [_sitk(mask.astype(np.float32) * 100.0 * (p + 1), spacing) for p in range(2)]
  record = reader.make_record(phases, _sitk(mask, spacing), (16, 48, 40), case_id="c", patient_id="p",
                              phase_times=[-1, -1], strata=0, collection="t")
  grid = reader.Geometry.from_dict(record["grid_geometry"])
  source = reader.Geometry.from_dict(record["source_geometry"])
  source_cc = mask.sum() * np.prod(spacing)
  grid_cc = record["mask"].sum() * np.prod(record["spacing"])
  assert abs(grid_cc / source_cc - 1) < 0.02
  # Same physical box: the outer faces of the grid equal those of the source.
  np.testing.assert_allclose(np.asarray(grid.size) * grid.spacing, np.asarray(source.size) * source.spacing)
  back = reader.resample_to_source(record["mask"], grid, source)
  assert back.shape == source_shape
  assert abs(back.sum() / mask.sum() - 1) < 0.02
  dice = 2 * np.sum(back & mask) / (back.sum() + mask.sum())
  assert dice > 0.9  # nearest down- then up-sampling by ~1.5x; a misplaced grid gives far less


@pytest.mark.parametrize("change, message", [
    (dict(spacing_zyx=(2.5, 0.8, 0.9)), "mask: spacing"),
    (dict(origin=(5.0, -3.0, 12.0 - 0.8)), "mask: origin is .* voxels"),  # one voxel along y
])
def test_image_mask_geometry_mismatch_is_a_case_error(change, message):
  array = np.zeros((4, 6, 5), np.float32)
  with pytest.raises(CaseError, match=f"^case-3: {message}"):
    reader.make_record([_sitk(array), _sitk(array)], _sitk(array.astype(np.uint8), **change), (4, 6, 5),
                       case_id="case-3", patient_id="p", phase_times=[-1, -1], strata=0, collection="t")


def test_sub_voxel_mask_origin_offset_is_accepted():
  array = np.ones((4, 6, 5), np.float32)
  mask = _sitk(array.astype(np.uint8), origin=(5.0, -3.0 + 0.2, 12.0))
  record = reader.make_record([_sitk(array), _sitk(array)], mask, (4, 6, 5), case_id="c", patient_id="p",
                              phase_times=[-1, -1], strata=0, collection="t")
  assert record["mask"].sum() == array.size


def test_unreadable_image_file_names_it(tmp_path):
  bad = tmp_path / "phase0.nii.gz"
  bad.write_bytes(b"\x1f\x8b not really gzip")
  with pytest.raises(CaseError, match=str(bad)):
    reader.read_image(bad)
