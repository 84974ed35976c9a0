"""Input pipeline: normalisation, slab sampling, determinism, state, sharding, devices."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import base as base_config
from rst2g_jax import input_pipeline as ip
from tfds_builders.records import CaseError

S, H, W = 32, 12, 12
TUMOR_SLICES = (14, 15)     # tumor on two slices only, so uniform slabs rarely hit it


def _case(i, num_phases=3, tumor=True):
  """A case with air (~5) around a body block (~100); tumor voxels double from pre to post."""
  rng = np.random.default_rng(100 + i)
  pre = rng.normal(5.0, 1.0, (S, H, W))
  pre[:, 2:10, 1:11] = rng.normal(100.0, 8.0, (S, 8, 10))
  mask = np.zeros((S, H, W), np.uint8)
  if tumor:
    mask[list(TUMOR_SLICES), 4:7, 4:7] = 1
  phases = [pre]
  for t in range(1, num_phases):
    phases.append(np.where(mask == 1, pre * (1.0 + t), pre))   # x2 at phase 1, x3 at phase 2
  return {"image": np.stack(phases).astype(np.float32), "mask": mask,
          "case_id": f"case{i:02d}".encode(), "patient_id": f"pat{i:02d}".encode(),
          "spacing": np.array([2.0, 0.7, 0.7], np.float32), "strata": i % 3}


@pytest.fixture(scope="module")
def source():
  return [_case(i) for i in range(6)]


def _data_cfg(**overrides):
  cfg = base_config.get_config().data
  cfg.slab = 4
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "mask"))


# -- normalisation ---------------------------------------------------------------------

def test_pre_body_normalisation_matches_numpy_and_keeps_enhancement():
  case = _case(0)
  image = case["image"].astype(np.float64)
  pre, post = image[0], image[1]
  body = pre > 50.0          # any cut between the air and body modes is the body
  mean, std = pre[body].mean(), pre[body].std()
  out = ip.normalize_case(case["image"])
  assert out.shape == (S, H, W, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], (pre - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[..., 1], (post - mean) / std, rtol=1e-5, atol=1e-5)
  tumor = case["mask"] == 1
  # A voxel that doubles has residual pre/std (its normalised pre value plus mean/std);
  # a voxel that does not enhance has residual 0.
  np.testing.assert_allclose(out[..., 2][tumor], pre[tumor] / std, rtol=1e-5)
  np.testing.assert_allclose(out[..., 2][tumor], out[..., 0][tumor] + mean / std, rtol=1e-5)
  assert np.all(out[..., 2][~tumor] == 0)
  assert 10.0 < ip.otsu_threshold(pre) < 90.0


def test_otsu_threshold_agrees_with_simpleitk():
  sitk = pytest.importorskip("SimpleITK")
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.normal(10, 5, 6000), rng.normal(60, 15, 12000)]).astype(np.float32)
  otsu = sitk.OtsuThresholdImageFilter()
  otsu.SetNumberOfHistogramBins(256)
  otsu.Execute(sitk.GetImageFromArray(values.reshape(1, 90, 200)))
  assert abs(ip.otsu_threshold(values) - otsu.GetThreshold()) < 0.5   # one bin is ~0.5


def test_pooled_and_per_phase_normalisations():
  case = _case(1)
  image = case["image"].astype(np.float64)
  pre, post = image[0], image[1]
  pooled = ip.normalize_case(case["image"], method="pooled")
  m, s = image.mean(), image.std()     # all voxels of all three phases
  np.testing.assert_allclose(pooled[..., 0], (pre - m) / s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled[..., 1], (post - m) / s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled[..., 2], (post - pre) / s, rtol=1e-4, atol=1e-5)
  per = ip.normalize_case(case["image"], method="per_phase")
  np.testing.assert_allclose(per[..., 0], (pre - pre.mean()) / pre.std(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per[..., 1], (post - post.mean()) / post.std(), rtol=1e-5, atol=1e-5)
  # Separate statistics give non-enhancing tissue a spurious residual.
  assert np.abs(per[..., 2][case["mask"] == 0]).max() > 0.01
  with pytest.raises(ip.DataError, match="unknown normalization 'zscore'"):
    ip.normalize_case(case["image"], method="zscore")


def test_post_phase_selection_and_out_of_range_error():
  case = _case(2)
  out = ip.normalize_case(case["image"], post_phase=2)
  tumor = case["mask"] == 1
  ratio = (out[..., 1][tumor] - out[..., 0][tumor]) / out[..., 2][tumor]
  np.testing.assert_allclose(ratio, 1.0, rtol=1e-5)
  std = case["image"][0][case["image"][0] > 50].astype(np.float64).std()
  np.testing.assert_allclose(out[..., 2][tumor], 2 * case["image"][0][tumor] / std, rtol=1e-4)
  with pytest.raises(CaseError, match=r"case02: post_phase 3 requested but the case has 3 phases"):
    ip.normalize_case(case["image"], post_phase=3, case_id="case02")
  with pytest.raises(CaseError, match="post_phase 0"):
    ip.normalize_case(case["image"], post_phase=0, case_id="case02")
  two_phase = [_case(0, num_phases=2)]
  ds = ip.train_dataset(two_phase, [0], _data_cfg(post_phase=2), batch_size=1, seed=0)
  with pytest.raises(CaseError, match="case00: post_phase 2 requested but the case has 2 phases"):
    next(iter(ds))


def test_load_case(source):
  case = ip.load_case(source, 3, _data_cfg())
  assert case["case_id"] == "case03" and case["patient_id"] == "pat03"
  np.testing.assert_array_equal(case["image"], ip.normalize_case(source[3]["image"]))
  assert case["mask"].dtype == np.uint8 and case["mask"].sum() == 18
  np.testing.assert_allclose(case["spacing"], [2.0, 0.7, 0.7])


# -- slabs and batches -------------------------------------------------------------------

def test_batch_shapes_and_slab_content(source):
  batch = _take(ip.train_dataset(source, range(6), _data_cfg(), batch_size=3, seed=0), 1)[0]
  assert batch["image"].shape == (3, 4, H, W, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (3, 4, H, W) and batch["mask"].dtype == np.float32
  # Every slab is a run of consecutive slices of some normalised case.
  full = [ip.normalize_case(c["image"]) for c in source]
  for slab in batch["image"]:
    assert any(np.array_equal(slab, f[z:z + 4]) for f in full for z in range(S - 3))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_slabs_contain_tumor_at_the_configured_rate(source, fraction):
  n = 1600
  # 120 records (the 6 cases repeated): Grain's index shuffle is slow on tiny datasets.
  many = [source[i % 6] for i in range(120)]
  ds = ip.train_dataset(many, range(120), _data_cfg(foreground_fraction=fraction),
                        batch_size=40, seed=3)
  hits = sum(int(m.reshape(m.shape[0], -1).max(1).sum()) for b in _take(ds, n // 40)
             for m in [b["mask"]])
  # Uniform starts 0..28; the 5 starts 11..15 cover slice 14 or 15.
  uniform = 5 / (S - 4 + 1)
  expected = fraction + (1 - fraction) * uniform
  sigma = np.sqrt(expected * (1 - expected) / n)
  assert abs(hits / n - expected) <= 4 * sigma + 1e-9, (hits / n, expected)


def test_case_without_tumor_falls_back_to_uniform():
  ds = ip.train_dataset([_case(0, tumor=False)], [0], _data_cfg(foreground_fraction=1.0),
                        batch_size=8, seed=0)
  assert all(b["mask"].sum() == 0 for b in _take(ds, 3))


def test_same_seed_same_batches_different_seed_differs(source):
  cfg = _data_cfg()
  a = _take(ip.train_dataset(source, range(6), cfg, batch_size=2, seed=11), 6)
  b = _take(ip.train_dataset(source, range(6), cfg, batch_size=2, seed=11), 6)
  c = _take(ip.train_dataset(source, range(6), cfg, batch_size=2, seed=12), 6)
  assert _same(a, b)
  assert not _same(a, c)


def test_iterator_state_restores_exactly(source):
  cfg = _data_cfg()
  ds = ip.train_dataset(source, [0, 2, 3, 5], cfg, batch_size=3, seed=4)
  it = iter(ds)
  _take(it, 5)                          # more than one epoch of 4 cases
  state = json.loads(json.dumps(it.get_state()))   # survives a JSON round trip
  expected = _take(it, 4)
  restored = iter(ip.train_dataset(source, [0, 2, 3, 5], cfg, batch_size=3, seed=4))
  restored.set_state(state)
  assert _same(_take(restored, 4), expected)
  fresh = _take(ip.train_dataset(source, [0, 2, 3, 5], cfg, batch_size=3, seed=4), 4)
  assert not _same(fresh, expected)


def test_worker_processes_give_the_same_batches(source):
  cfg = _data_cfg()
  expected = _take(ip.train_dataset(source, range(6), cfg, batch_size=2, seed=8), 4)
  it = iter(ip.train_dataset(source, range(6), _data_cfg(worker_count=1), batch_size=2, seed=8))
  try:
    got = _take(it, 2)
    state = it.get_state()
    assert _same(got, expected[:2])
  finally:
    it.close()
  it = iter(ip.train_dataset(source, range(6), _data_cfg(worker_count=1), batch_size=2, seed=8))
  try:
    it.set_state(state)
    assert _same(_take(it, 2), expected[2:])
  finally:
    it.close()


def test_process_shards_are_disjoint_and_make_up_the_global_batch(source):
  cfg = _data_cfg()
  whole = _take(ip.train_dataset(source, range(6), cfg, batch_size=6, seed=2), 3)
  shards = [_take(ip.train_dataset(source, range(6), cfg, batch_size=6, seed=2,
                                   shard_index=p, shard_count=3), 3) for p in range(3)]
  for step, batch in enumerate(whole):
    parts = [shards[p][step] for p in range(3)]
    assert all(part["image"].shape[0] == 2 for part in parts)
    for k in ("image", "mask"):
      np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), batch[k])
  with pytest.raises(ip.DataError, match="global batch size 5 is not a positive multiple of the 2"):
    ip.train_dataset(source, range(6), cfg, batch_size=5, seed=0, shard_count=2)
  with pytest.raises(ip.DataError, match="case ids not in the dataset: nope"):
    ip.record_indices([{"case_id": "case00"}], ["case00", "nope"])


def test_device_batches_make_global_arrays_sharded_over_data(source):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  host = _take(ip.train_dataset(source, range(6), _data_cfg(), batch_size=8, seed=1), 2)
  ds = ip.train_dataset(source, range(6), _data_cfg(), batch_size=8, seed=1)
  got = list(zip(range(2), ip.device_batches(iter(ds), sharding)))
  for (_, batch), expected in zip(got, host):
    for k in ("image", "mask"):
      arr = batch[k]
      assert isinstance(arr, jax.Array) and arr.shape == expected[k].shape
      assert arr.sharding.is_equivalent_to(sharding, arr.ndim)
      assert len(arr.addressable_shards) == 8
      for shard in arr.addressable_shards:
        assert shard.data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(shard.data), expected[k][shard.index])
      np.testing.assert_array_equal(np.asarray(arr), expected[k])


# -- a real build --------------------------------------------------------------------------

def test_reads_a_built_tiny_collection_through_tfds_data_source(tmp_path):
  from tfds_builders import build
  cfg = _data_cfg(builder="synthetic_dce", builder_config="tiny")
  with pytest.raises(ip.DataError, match=r"synthetic_dce/tiny: no built dataset .*python -m tfds_builders.build synthetic_dce --config=tiny"):
    ip.open_source(cfg, str(tmp_path))
  build.build("synthetic_dce", data_dir=str(tmp_path), config="tiny", progress=False)
  source, cases = ip.open_source(cfg, str(tmp_path))
  assert len(source) == len(cases) == 6
  for i, row in enumerate(cases):   # the case table is in record order
    record = source[i]
    assert ip._text(record["case_id"]) == row["case_id"]
    assert int(record["mask"].sum()) == row["tumor_voxels"]
  case = ip.load_case(source, 2, cfg)
  assert case["case_id"] == cases[2]["case_id"] and case["patient_id"] == cases[2]["patient_id"]
  np.testing.assert_array_equal(case["image"], ip.normalize_case(source[2]["image"]))
  num_slices, height, width = source[0]["mask"].shape
  batch = _take(ip.train_dataset(source, range(6), cfg, batch_size=2, seed=0), 1)[0]
  assert batch["image"].shape == (2, 4, height, width, 3) and np.isfinite(batch["image"]).all()
  with pytest.raises(ip.DataError, match="unknown builder 'nope'"):
    ip.open_source(_data_cfg(builder="nope"), str(tmp_path))


def test_iterator_state_round_trips_through_an_orbax_checkpoint(source, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  make = lambda: iter(ip.train_dataset(source, range(6), _data_cfg(), batch_size=2, seed=5))
  it = make()
  _take(it, 7)
  manager = ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = _take(it, 3)
  restored = make()
  manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert _same(_take(restored, 3), expected)
  manager.close()
