"""2D U-Net baseline (paper Table 1, row "U-Net") in the same framework and conventions.

Each slice is segmented on its own from the three input channels (pre, post, residual)
stacked as image channels: stem DoubleConv, DownBlocks without the residual projection,
then the same CDecoder as RST2G. Same input/output contract as `model.RST2G`.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from rst2g_jax import layers
from rst2g_jax.layers import CDecoder, DoubleConv, DownBlock, LayerOptions


class UNet2D(nnx.Module):
  """[B, S, H, W, 3] -> [B, S, H, W] float32 logits, widths from `stem_features`, `features`."""

  def __init__(self, cfg, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    opts = LayerOptions.from_config(cfg, dtype)
    widths = (int(cfg.stem_features),) + tuple(int(f) for f in cfg.features)
    self.dtype = dtype
    self.remat = remat
    self.stride = 2 ** len(cfg.features)
    self.stem = DoubleConv(3, widths[0], opts=opts, rngs=rngs)
    self.downs = nnx.List([DownBlock(c_in, c_out, residual=False, opts=opts, rngs=rngs)
                           for c_in, c_out in zip(widths[:-1], widths[1:])])
    self.decoder = CDecoder(widths, opts=opts, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    layers.check_slab_input(x, name="UNet2D", stride=self.stride)
    b, s, h, w, c = x.shape
    feats = [layers.apply_stage(self.stem, x.reshape(b * s, h, w, c).astype(self.dtype),
                                self.remat)]
    for down in self.downs:
      feats.append(layers.apply_stage(down, feats[-1], self.remat))
    logits = self.decoder(feats[-1], feats[:-1])
    return logits.reshape(b, s, h, w).astype(jnp.float32)
