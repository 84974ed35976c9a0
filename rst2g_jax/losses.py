"""The paper's hybrid training loss (eqs. 17-20): Dice + lambda*BCE + beta*Boundary.

All functions are pure `jax.numpy`, jittable and differentiable, and take arrays
of shape [..., H, W] whose leading axes are independent slices (e.g. [B, S, H, W]).
Everything is computed in float32 whatever the input dtype, so that bfloat16
logits do not lose the small per-voxel terms when they are summed.

Conventions (README "Training loss"):
- Dice (eq. 18) is the soft Dice over the whole batch: the sums run over every
  voxel of every slice, so that slices without tumor do not each add a loss of
  ~1 (a per-slice Dice would be undefined there).
- BCE (eq. 19) is evaluated from logits in the stable form
  max(x, 0) - x*g + log1p(exp(-|x|)), which equals -[g log p + (1-g) log(1-p)]
  with p = sigmoid(x) but never takes the log of 0.
- Boundary (eq. 20) is mean_i(|Gx(p)-Gx(g)|_i + |Gy(p)-Gy(g)|_i) with the 3x3
  Sobel kernels applied in-plane to each slice. Gx differentiates along the last
  axis (x, columns), Gy along the second-to-last axis (y, rows); both are
  central differences f[i+1] - f[i-1] smoothed by [1, 2, 1] across, i.e. exactly
  `scipy.ndimage.sobel(slice2d, axis=1)` and `axis=0`. Borders use half-sample
  symmetric padding (the edge voxel repeated: `jnp.pad(mode="symmetric")`),
  which is SciPy's default `mode="reflect"`. The paper does not say whether
  "|Sobel(p) - Sobel(g)|" is a gradient magnitude; we take the L1 sum of the two
  components (DESIGN.md §5). Sobel is linear, so it is applied once to p - g.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_shapes(logits_or_probs: jax.Array, targets: jax.Array) -> None:
  if logits_or_probs.shape != targets.shape:
    raise ValueError(
        f"loss expects predictions and targets of the same shape [..., H, W], "
        f"got {logits_or_probs.shape} and {targets.shape}")
  if logits_or_probs.ndim < 2:
    raise ValueError(
        f"loss expects arrays of at least 2 dims [..., H, W], got shape {logits_or_probs.shape}")


def dice_loss(probs: jax.Array, targets: jax.Array, eps: float = 1.0) -> jax.Array:
  """Soft Dice loss (eq. 18) summed over all voxels of the batch."""
  _check_shapes(probs, targets)
  p = probs.astype(jnp.float32)
  g = targets.astype(jnp.float32)
  return 1.0 - (2.0 * jnp.sum(p * g) + eps) / (jnp.sum(p) + jnp.sum(g) + eps)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Binary cross-entropy (eq. 19) from logits, numerically stable, mean over voxels."""
  _check_shapes(logits, targets)
  x = logits.astype(jnp.float32)
  g = targets.astype(jnp.float32)
  return jnp.mean(jnp.maximum(x, 0.0) - x * g + jnp.log1p(jnp.exp(-jnp.abs(x))))


def sobel_gradients(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """In-plane 3x3 Sobel responses (gx, gy) of every slice of [..., H, W].

  gx = d/dx along the last axis, gy = d/dy along the second-to-last axis, each
  equal to `scipy.ndimage.sobel(slice2d, axis=1 / axis=0)` (mode="reflect").
  Written as shifted slices of the padded array: XLA fuses it into one pass,
  and it needs no layout change for arbitrary leading axes.
  """
  x = images.astype(jnp.float32)
  pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
  xp = jnp.pad(x, pad, mode="symmetric")
  # Derivative [-1, 0, 1] along one axis, smoothing [1, 2, 1] along the other.
  dx = xp[..., :, 2:] - xp[..., :, :-2]              # [..., H+2, W]
  gx = dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]
  dy = xp[..., 2:, :] - xp[..., :-2, :]              # [..., H, W+2]
  gy = dy[..., :, :-2] + 2.0 * dy[..., :, 1:-1] + dy[..., :, 2:]
  return gx, gy


def boundary_loss(probs: jax.Array, targets: jax.Array) -> jax.Array:
  """Sobel boundary loss (eq. 20): mean over voxels of |Gx(p-g)| + |Gy(p-g)|."""
  _check_shapes(probs, targets)
  gx, gy = sobel_gradients(probs.astype(jnp.float32) - targets.astype(jnp.float32))
  return jnp.mean(jnp.abs(gx) + jnp.abs(gy))


def rst2g_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    bce_weight: float = 0.5,
    boundary_weight: float = 0.2,
    dice_eps: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss (eq. 17) and its three terms, all float32 scalars.

  Args:
    logits: [..., H, W] raw model outputs (one logit per voxel).
    targets: same shape, 0/1 tumor mask (any numeric dtype).
    bce_weight: lambda of eq. 17 (paper: 0.5).
    boundary_weight: beta of eq. 17 (paper: 0.2).
    dice_eps: epsilon of eq. 18 (DESIGN.md: 1).
  Returns:
    (total, {"dice", "bce", "boundary"}) with
    total = dice + bce_weight * bce + boundary_weight * boundary.
  """
  _check_shapes(logits, targets)
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  probs = jax.nn.sigmoid(logits)
  terms = {
      "dice": dice_loss(probs, targets, eps=dice_eps),
      "bce": bce_with_logits(logits, targets),
      "boundary": boundary_loss(probs, targets),
  }
  total = terms["dice"] + bce_weight * terms["bce"] + boundary_weight * terms["boundary"]
  return total, terms
