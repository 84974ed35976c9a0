"""Convolutional building blocks shared by RST2G and the U-Net baseline (NHWC).

Conventions (the PyTorch reference mirrors them):
- a convolution followed by BatchNorm has no bias: eq. 1's `b` is absorbed by BN's shift
  (in training mode it would get an exactly zero gradient); every other conv has a bias;
- BatchNorm uses batch statistics in `model.train()` and running statistics in
  `model.eval()`; `bn_momentum` follows Flax (0.9 == PyTorch momentum 0.1);
- parameters are float32, `dtype` is the compute dtype.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  """Settings every convolutional layer of one network shares."""
  dtype: jnp.dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_unbiased_running_var: bool = True

  @classmethod
  def from_config(cls, cfg, dtype) -> "LayerOptions":
    return cls(dtype=dtype, bn_momentum=cfg.bn_momentum, bn_epsilon=cfg.bn_epsilon,
               bn_unbiased_running_var=cfg.get("bn_unbiased_running_var", True))


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm whose running variance can track the unbiased batch variance.

  torch.nn.BatchNorm2d, which the paper's authors trained with, normalises by the biased batch
  variance but accumulates the unbiased one (x n/(n-1), n elements per channel); nnx.BatchNorm
  accumulates the biased one, so its running variance settles (n-1)/n of PyTorch's. With
  `unbiased_running_var=False` this is exactly nnx.BatchNorm.
  """

  def __init__(self, num_features: int, *, unbiased_running_var: bool = True, **kwargs):
    super().__init__(num_features, **kwargs)
    self.unbiased_running_var = unbiased_running_var

  def __call__(self, x, use_running_average=None, *, mask=None):
    old_var = self.var[...]
    y = super().__call__(x, use_running_average, mask=mask)
    training = not (self.use_running_average if use_running_average is None else use_running_average)
    if training and self.unbiased_running_var and mask is None:
      n = x.size // x.shape[-1]
      # super() stored m*old + (1-m)*v; PyTorch's is m*old + (1-m)*v*n/(n-1).
      new_var = self.var[...]
      self.var[...] = jax.lax.stop_gradient(
          new_var + (new_var - self.momentum * old_var) / max(n - 1, 1))
    return y


def conv(in_features: int, out_features: int, kernel_size: int, opts: LayerOptions,
         rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Conv:
  """A 'SAME'-padded, stride-1 convolution."""
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), padding="SAME",
                  use_bias=use_bias, dtype=opts.dtype, rngs=rngs)


def _as_tuple(value) -> tuple:
  if value is None:
    return (1,)
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_pointwise(module: nnx.Conv) -> bool:
  """A plain 1x1 conv: stride 1, no dilation, no groups, no mask."""
  return (tuple(module.kernel_size) == (1, 1) and module.feature_group_count == 1
          and module.mask is None
          and all(int(v) == 1 for v in _as_tuple(module.strides))
          and all(int(v) == 1 for v in _as_tuple(module.input_dilation))
          and all(int(v) == 1 for v in _as_tuple(module.kernel_dilation)))


def apply_conv(module: nnx.Conv, x: jax.Array) -> jax.Array:
  """`module(x)`; a 1x1 conv runs as a matmul over the channel axis.

  Same parameters, same sums: [N*H*W, C_in] @ [C_in, C_out] + bias. XLA:CPU runs a 1x1
  convolution (and its two backward convolutions) as generic convolutions; as dots the
  synthetic config's train step takes ~2 % less CPU time (README "CPU performance").
  """
  if not _is_pointwise(module):
    return module(x)
  kernel = module.kernel[...]
  bias = module.bias[...] if module.bias is not None else None
  x, kernel, bias = module.promote_dtype((x, kernel, bias), dtype=module.dtype)
  y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel[0, 0], precision=module.precision)
  y = y.reshape(*x.shape[:-1], kernel.shape[-1])
  return y if bias is None else y + bias


def _pool_windows(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, H/2, 2, W/2, 2, C]: the 2x2 windows (an odd last row/column dropped)."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2 (VALID), NHWC.

  Same values and gradient as `nnx.max_pool(x, (2, 2), strides=(2, 2))` and PyTorch's
  `max_pool2d(x, 2)`: the gradient goes to the first maximum of each window in row-major
  order. Ties are common here (ReLU zeros, pixels where only a bias survives), so which
  maximum gets the gradient matters. Written as a reshape, max and argmax, which XLA:CPU fuses
  into a few loops: in training, `nnx.max_pool`'s reduce_window/select_and_scatter pair packs
  values with index iotas and runs several times slower (README "CPU performance"). (A mask
  `window == max` with a running "taken" flag gave other gradients once jitted; argmax does not.)
  """
  return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool2_fwd(x):
  return max_pool2(x), x


def _max_pool2_bwd(x, g):
  windows = _pool_windows(x)                                   # [N, h, 2, w, 2, C]
  taps = jnp.stack([windows[:, :, dy, :, dx] for dy in (0, 1) for dx in (0, 1)], axis=-1)
  first = jnp.argmax(taps, axis=-1)                            # row-major tap of the first max
  zero = jnp.zeros_like(g)
  grads = [jnp.where(first == k, g, zero) for k in range(4)]
  rows = [jnp.stack(grads[2 * dy:2 * dy + 2], axis=3) for dy in (0, 1)]   # [N, h, w, 2, C]
  n, h, w, c = x.shape
  dx = jnp.stack(rows, axis=2).reshape(n, h // 2 * 2, w // 2 * 2, c)     # [N, 2h, 2w, C]
  if dx.shape != x.shape:
    dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
  return (dx,)


max_pool2.defvjp(_max_pool2_fwd, _max_pool2_bwd)


def conv_transpose2x2(up: nnx.ConvTranspose, x: jax.Array) -> jax.Array:
  """`up(x)` for a 2x2, stride-2, VALID nnx.ConvTranspose, as one matmul and a reshape.

  The output windows do not overlap, so each output pixel is one input pixel times one kernel
  tap: y[2i+a, 2j+b] = x[i, j] @ K[1-a, 1-b] + bias (lax.conv_transpose without
  `transpose_kernel` flips the kernel). Same sums as the conv, but XLA:CPU runs this as a dot
  whose backward pass is two dots, where the conv's weight gradient is a slow dilated
  convolution (README "CPU performance"). Any other ConvTranspose runs as `up(x)`.
  """
  kernel = up.kernel[...]
  plain = (kernel.shape[:2] == (2, 2) and _as_tuple(up.strides) == (2, 2)
           and up.padding == "VALID" and not up.transpose_kernel and up.mask is None
           and all(int(v) == 1 for v in _as_tuple(up.kernel_dilation)))
  if not plain or x.ndim != 4:
    return up(x)
  bias = up.bias[...] if up.bias is not None else None
  x, kernel, bias = up.promote_dtype((x, kernel, bias), dtype=up.dtype)
  n, h, w, _ = x.shape
  kernel = jnp.flip(kernel, (0, 1))                          # [a, b, C_in, C_out]
  y = jnp.einsum("nijc,abco->niajbo", x, kernel, precision=up.precision)
  y = y.reshape(n, 2 * h, 2 * w, kernel.shape[-1])
  return y if bias is None else y + bias


def _apply(module: nnx.Module, x: jax.Array) -> jax.Array:
  return module(x)


_apply_remat = nnx.remat(_apply)


def apply_stage(module: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
  """module(x), rematerialised in the backward pass (jax.checkpoint) when `remat`."""
  return (_apply_remat if remat else _apply)(module, x)


class ConvBNReLU(nnx.Module):
  """conv(k x k, no bias) -> BatchNorm -> ReLU (eq. 1)."""

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
               opts: LayerOptions, rngs: nnx.Rngs):
    self.conv = conv(in_features, out_features, kernel_size, opts, rngs, use_bias=False)
    self.bn = BatchNorm(out_features, momentum=opts.bn_momentum, epsilon=opts.bn_epsilon,
                        unbiased_running_var=opts.bn_unbiased_running_var, dtype=opts.dtype,
                        rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.bn(apply_conv(self.conv, x)))


class DoubleConv(nnx.Module):
  """Two ConvBNReLU layers, the unit of every encoder and decoder stage."""

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
               opts: LayerOptions, rngs: nnx.Rngs):
    self.first = ConvBNReLU(in_features, out_features, kernel_size=kernel_size, opts=opts,
                            rngs=rngs)
    self.second = ConvBNReLU(out_features, out_features, kernel_size=kernel_size, opts=opts,
                             rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.second(self.first(x))


class DownBlock(nnx.Module):
  """maxpool 2 -> DoubleConv, plus (if `residual`) a 1x1 projection of the pooled input.

  The projection is added after the second ReLU: `out = convs(p) + proj(p)`.
  The U-Net baseline uses `residual=False` (the classic U-Net stage).
  """

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
               residual: bool = True, opts: LayerOptions, rngs: nnx.Rngs):
    self.convs = DoubleConv(in_features, out_features, kernel_size=kernel_size, opts=opts,
                            rngs=rngs)
    self.proj = conv(in_features, out_features, 1, opts, rngs) if residual else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = max_pool2(x)
    y = self.convs(x)
    return y if self.proj is None else y + apply_conv(self.proj, x)


class UpBlock(nnx.Module):
  """2x2 transposed conv (stride 2) -> concat with the skip -> DoubleConv."""

  def __init__(self, in_features: int, out_features: int, *, opts: LayerOptions,
               rngs: nnx.Rngs):
    self.up = nnx.ConvTranspose(in_features, out_features, (2, 2), strides=(2, 2),
                                padding="VALID", use_bias=True, dtype=opts.dtype, rngs=rngs)
    self.convs = DoubleConv(2 * out_features, out_features, opts=opts, rngs=rngs)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x = conv_transpose2x2(self.up, x)
    return self.convs(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))


class GatedFusion(nnx.Module):
  """Channel MLP (1x1 conv in->C, ReLU, 1x1 conv C->C), then `F * sigmoid(conv1x1_C->1(F))`.

  The fusion step of MSR (eqs. 7-8) and of ITA (eqs. 14-16).
  """

  def __init__(self, in_features: int, features: int, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.mlp_in = conv(in_features, features, 1, opts, rngs)
    self.mlp_out = conv(features, features, 1, opts, rngs)
    self.gate = conv(features, 1, 1, opts, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    fused = apply_conv(self.mlp_out, nnx.relu(apply_conv(self.mlp_in, x)))
    return fused * nnx.sigmoid(apply_conv(self.gate, fused))


class CDecoder(nnx.Module):
  """One UpBlock per encoder downsampling, deepest first, then a 1x1 conv to one logit."""

  def __init__(self, widths, *, opts: LayerOptions, rngs: nnx.Rngs):
    widths = tuple(widths)
    self.ups = nnx.List([
        UpBlock(widths[i + 1], widths[i], opts=opts, rngs=rngs)
        for i in reversed(range(len(widths) - 1))])
    self.head = conv(widths[0], 1, 1, opts, rngs)

  def __call__(self, x: jax.Array, skips) -> jax.Array:
    """x: bottleneck; skips: features of every shallower scale, stem first."""
    for up, skip in zip(self.ups, reversed(skips)):
      x = up(x, skip)
    return apply_conv(self.head, x)[..., 0]


def check_slab_input(x: jax.Array, *, name: str, stride: int, image_size=None) -> None:
  """Raises ValueError unless x is [B, S, H, W, 3] with H, W divisible by `stride`.

  `image_size` (H, W), when given, must match exactly (a learned position embedding).
  """
  shape = tuple(x.shape)
  ok = len(shape) == 5 and shape[-1] == 3 and shape[2] % stride == 0 and shape[3] % stride == 0
  if ok and image_size is not None:
    ok = tuple(shape[2:4]) == tuple(image_size)
  if not ok:
    if image_size is None:
      expected = f"[B, S, H, W, 3] with H, W divisible by {stride}"
    else:
      h, w = image_size
      expected = (f"[B, S, {h}, {w}, 3] (model.image_size; the position embedding is sized "
                  f"for it)")
    raise ValueError(f"{name} expects {expected}; got {shape}")
