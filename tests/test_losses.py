"""The loss terms against independent NumPy/SciPy computations (eqs. 17-20)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from rst2g_jax import losses

# Non-square slices and several leading axes, so that a swapped x/y or a Sobel
# that mixes slices would show.
SHAPE = (2, 3, 9, 13)


def _random_inputs(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 3.0, SHAPE).astype(np.float32)
  targets = (rng.random(SHAPE) < 0.3).astype(np.float32)
  return logits, targets


def _sigmoid64(x):
  return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _reference_sobel(images):
  """scipy.ndimage.sobel on each 2D slice: gx along x (axis=1), gy along y (axis=0)."""
  flat = images.astype(np.float64).reshape(-1, *images.shape[-2:])
  gx = np.stack([ndimage.sobel(s, axis=1, mode="reflect") for s in flat])
  gy = np.stack([ndimage.sobel(s, axis=0, mode="reflect") for s in flat])
  return gx.reshape(images.shape), gy.reshape(images.shape)


def _reference_terms(logits, targets, eps=1.0):
  p, g = _sigmoid64(logits), targets.astype(np.float64)
  dice = 1.0 - (2.0 * np.sum(p * g) + eps) / (np.sum(p) + np.sum(g) + eps)
  bce = -np.mean(g * np.log(p) + (1.0 - g) * np.log(1.0 - p))
  gx_p, gy_p = _reference_sobel(p)
  gx_g, gy_g = _reference_sobel(g)
  boundary = np.mean(np.abs(gx_p - gx_g) + np.abs(gy_p - gy_g))
  return {"dice": dice, "bce": bce, "boundary": boundary}


def test_sobel_matches_scipy_per_slice_with_signs():
  images = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
  gx, gy = losses.sobel_gradients(jnp.asarray(images))
  ref_gx, ref_gy = _reference_sobel(images)
  np.testing.assert_allclose(np.asarray(gx), ref_gx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gy), ref_gy, rtol=1e-5, atol=1e-5)
  # Orientation: a ramp increasing along x has gx = +8 per unit step (central
  # difference 2, smoothing weight 4) and gy = 0, borders included.
  ramp = jnp.broadcast_to(jnp.arange(13.0), (9, 13))
  gx, gy = losses.sobel_gradients(ramp)
  np.testing.assert_allclose(np.asarray(gx)[:, 1:-1], 8.0)
  np.testing.assert_allclose(np.asarray(gx)[:, 0], 4.0)  # symmetric padding at the edge
  np.testing.assert_allclose(np.asarray(gy), 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_term_and_total_match_numpy(seed):
  logits, targets = _random_inputs(seed)
  total, terms = jax.jit(losses.rst2g_loss)(jnp.asarray(logits), jnp.asarray(targets))
  expected = _reference_terms(logits, targets)
  for name in ("dice", "bce", "boundary"):
    assert terms[name].dtype == jnp.float32 and terms[name].shape == ()
    np.testing.assert_allclose(float(terms[name]), expected[name], rtol=1e-5, err_msg=name)
  weighted = expected["dice"] + 0.5 * expected["bce"] + 0.2 * expected["boundary"]
  np.testing.assert_allclose(float(total), weighted, rtol=1e-5)
  # Other weights and eps reach the right places.
  total2, terms2 = losses.rst2g_loss(
      jnp.asarray(logits), jnp.asarray(targets), bce_weight=0.3, boundary_weight=0.9, dice_eps=1e-3)
  expected2 = _reference_terms(logits, targets, eps=1e-3)
  np.testing.assert_allclose(float(terms2["dice"]), expected2["dice"], rtol=1e-5)
  np.testing.assert_allclose(
      float(total2), expected2["dice"] + 0.3 * expected2["bce"] + 0.9 * expected2["boundary"],
      rtol=1e-5)


def test_public_terms_match_numpy():
  logits, targets = _random_inputs(2)
  expected = _reference_terms(logits, targets)
  p = jax.nn.sigmoid(jnp.asarray(logits))
  np.testing.assert_allclose(float(losses.dice_loss(p, targets)), expected["dice"], rtol=1e-5)
  np.testing.assert_allclose(float(losses.bce_with_logits(logits, targets)), expected["bce"], rtol=1e-5)
  np.testing.assert_allclose(float(losses.boundary_loss(p, targets)), expected["boundary"], rtol=1e-5)


def test_bce_is_stable_for_extreme_logits():
  logits = jnp.array([[-200.0, 200.0], [200.0, -200.0]])
  targets = jnp.array([[0.0, 1.0], [0.0, 1.0]])
  # Two voxels right (loss ~0), two wrong by 200 each -> mean 100, finite.
  np.testing.assert_allclose(float(losses.bce_with_logits(logits, targets)), 100.0, rtol=1e-6)


def test_gradient_is_finite_and_bce_part_is_analytic():
  logits, targets = _random_inputs(3)
  grad = jax.grad(lambda x: losses.rst2g_loss(x, targets)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)
  # d BCE / dx = (sigmoid(x) - g) / N.
  grad_bce = jax.grad(losses.bce_with_logits)(jnp.asarray(logits), targets)
  expected = (_sigmoid64(logits) - targets) / logits.size
  np.testing.assert_allclose(np.asarray(grad_bce), expected, rtol=1e-4, atol=1e-9)


def test_perfect_prediction_gives_zero_terms():
  _, targets = _random_inputs(4)
  logits = np.where(targets > 0, 30.0, -30.0).astype(np.float32)
  total, terms = losses.rst2g_loss(jnp.asarray(logits), jnp.asarray(targets))
  for name, value in terms.items():
    assert 0.0 <= float(value) < 1e-6, (name, float(value))
  assert float(total) < 1e-6
  # And a wrong prediction is far from zero on every term.
  _, bad = losses.rst2g_loss(jnp.asarray(-logits), jnp.asarray(targets))
  assert float(bad["dice"]) > 0.9 and float(bad["bce"]) > 10 and float(bad["boundary"]) > 1


def test_bfloat16_logits_give_float32_terms():
  logits, targets = _random_inputs(5)
  total, terms = losses.rst2g_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets, jnp.uint8))
  assert total.dtype == jnp.float32
  expected = _reference_terms(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), targets)
  np.testing.assert_allclose(float(terms["bce"]), expected["bce"], rtol=1e-5)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="same shape"):
    losses.rst2g_loss(jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 5)))
