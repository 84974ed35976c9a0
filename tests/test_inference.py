"""Sliding-slab whole-volume inference: coverage, blending weights, TTA, postprocessing."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from rst2g_jax import inference
from rst2g_jax import train_state as ts


def test_gaussian_weights_are_symmetric_peaked_and_positive():
  w = inference.blend_weights(8, "gaussian")
  np.testing.assert_allclose(w, w[::-1])
  assert w.max() == pytest.approx(1.0) and np.all(w > 0)
  # sigma = 8/8 = 1 slice around the centre 3.5; slices 3, 4 (0.5 away) carry the max,
  # slice 2 (1.5 away) exp(-(1.5**2 - 0.5**2) / 2) = exp(-1) of it.
  np.testing.assert_allclose(w[2], np.exp(-1.0), rtol=1e-6)
  np.testing.assert_array_equal(inference.blend_weights(4, "uniform"), np.ones(4))
  with pytest.raises(ValueError, match="blend"):
    inference.blend_weights(4, "box")


@pytest.mark.parametrize("num_slices,slab,step", [(10, 4, 2), (11, 4, 2), (9, 4, 3), (4, 4, 2), (7, 4, 4)])
def test_slab_starts_cover_every_slice(num_slices, slab, step):
  starts = inference.slab_starts(num_slices, slab, step)
  assert starts[0] == 0 and starts[-1] == num_slices - slab
  covered = np.zeros(num_slices, int)
  for s in starts:
    covered[s:s + slab] += 1
  assert covered.min() >= 1
  assert all(b - a <= step for a, b in zip(starts, starts[1:]))


def _volume(num_slices=11, h=4, w=5):
  z = np.arange(num_slices, dtype=np.float32)[:, None, None, None]
  return np.broadcast_to(z, (num_slices, h, w, 3)).copy()


def test_constant_model_gives_constant_probability_map():
  vol = _volume()
  out = inference.sliding_slab_logits(vol, lambda x: np.full(x.shape[:4], 0.7, np.float32),
                                      slab=4, step=2, blend="gaussian", batch_size=2)
  np.testing.assert_allclose(out, 0.7, rtol=1e-6)
  np.testing.assert_allclose(inference.sigmoid(out), 1 / (1 + np.exp(-0.7)), rtol=1e-6)


def test_slabs_land_on_their_slices():
  # A model that returns its input's slice index: blending must reproduce it exactly.
  vol = _volume(13)
  out = inference.sliding_slab_logits(vol, lambda x: x[..., 0], slab=4, step=3, batch_size=3)
  np.testing.assert_allclose(out[:, 0, 0], np.arange(13), atol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
def test_weights_at_first_last_and_overlapping_slices(blend):
  # The model returns each slice's position inside its slab (0..3), which differs between
  # overlapping slabs, so the output is the weighted mean of those positions.
  slab, step, n = 4, 2, 10
  w = inference.blend_weights(slab, blend)
  local = np.broadcast_to(np.arange(slab, dtype=np.float32)[None, :, None, None], (1, slab, 2, 2))
  out = inference.sliding_slab_logits(_volume(n, 2, 2), lambda x: np.repeat(local, len(x), 0),
                                      slab=slab, step=step, blend=blend)
  assert out[0, 0, 0] == pytest.approx(0.0)         # only the first slab, at its position 0
  assert out[-1, 0, 0] == pytest.approx(slab - 1)   # only the last slab, at its position 3
  # Slice 2 is position 2 of slab 0 and position 0 of slab 2.
  expected = (w[2] * 2 + w[0] * 0) / (w[2] + w[0])
  assert out[2, 0, 0] == pytest.approx(expected, rel=1e-6)


def test_batching_and_short_volumes_do_not_change_results():
  rng = np.random.default_rng(0)
  vol = rng.normal(size=(9, 3, 3, 3)).astype(np.float32)
  fn = lambda x: x.sum(-1) * np.arange(1, x.shape[1] + 1)[None, :, None, None]
  a = inference.sliding_slab_logits(vol, fn, slab=4, step=2, batch_size=1)
  b = inference.sliding_slab_logits(vol, fn, slab=4, step=2, batch_size=4)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  short = inference.sliding_slab_logits(vol[:2], lambda x: x[..., 0], slab=4, step=2)
  assert short.shape == (2, 3, 3)
  np.testing.assert_allclose(short, vol[:2, ..., 0], rtol=1e-6)


def test_largest_component_and_segment():
  mask = np.zeros((5, 8, 8), bool)
  mask[1:3, 1:3, 1:3] = True      # 8 voxels
  mask[3:5, 5:8, 5:8] = True      # 18 voxels
  kept = inference.largest_component(mask)
  assert kept.sum() == 18 and not kept[1, 1, 1]
  probs = mask.astype(np.float32) * 0.9
  np.testing.assert_array_equal(inference.segment(probs, threshold=0.5), mask)
  np.testing.assert_array_equal(inference.segment(probs, keep_largest=True), kept)


class _Asymmetric(nnx.Module):
  """Not flip-equivariant: output depends on the x coordinate."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 1, (3, 3), rngs=rngs)

  def __call__(self, x):
    b, s, h, w, c = x.shape
    y = self.conv(x.reshape(b * s, h, w, c))[..., 0].reshape(b, s, h, w)
    return y + jnp.arange(w, dtype=y.dtype)


def test_mirror_tta_averages_the_four_in_plane_flips():
  model = _Asymmetric(nnx.Rngs(0))
  graphs, params, rest = ts.split_model(model)
  mesh = ts.make_mesh(ml_collections.ConfigDict({"data": 2}))
  x = np.random.default_rng(1).normal(size=(2, 4, 6, 6, 3)).astype(np.float32)
  plain = ts.make_predict_fn(graphs.eval, mesh)
  tta = ts.make_predict_fn(graphs.eval, mesh, mirror_tta=True)
  xs = jax.device_put(x, ts.batch_sharding(mesh))
  f = lambda v: np.asarray(plain(params, rest, jax.device_put(v, ts.batch_sharding(mesh))))
  expected = (f(x) + f(x[:, :, ::-1])[:, :, ::-1] + f(x[:, :, :, ::-1])[:, :, :, ::-1]
              + f(x[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]) / 4
  got = np.asarray(tta(params, rest, xs))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, f(x), atol=1e-3)
