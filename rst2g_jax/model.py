"""RST2G in Flax NNX (NHWC), as DESIGN.md §4 and the paper's Methods describe it.

Input `[B, S, H, W, 3]` (channels: pre, post, residual), output `[B, S, H, W]` float32 logits.

Choices where the paper and DESIGN.md leave room (the PyTorch reference follows them):
- Encoder: the three inputs are single-channel images stacked along the batch axis and run
  through one encoder once, so BatchNorm statistics are pooled over pre, post and residual.
- DownBlock: `out = DoubleConv(maxpool(x)) + conv1x1(maxpool(x))` (projection with bias,
  no BN, added after the second ReLU). Convs followed by BatchNorm have no bias: eq. 1's `b`
  is absorbed by BN's shift (and would get an exactly zero gradient in training mode).
- ViT: pre-LN blocks `z + MHSA(LN(z))`, `z + MLP(LN(z))`, MLP D -> 4D -> D with exact GELU,
  a final LayerNorm, no extra residual around the stack; LayerNorm epsilon 1e-5 (PyTorch's);
  q, k, v from one packed Linear with bias (PyTorch `nn.MultiheadAttention` layout);
  position embedding `[1, H'W', D]`, normal(0.02) init, sized for `model.image_size`.
- MSR runs at every scale that feeds the decoder (the stem and the first L-1 DownBlocks);
  the deepest map goes through the ViT to STGE, which is what the decoder starts from.
- GAT: single head, `W` without bias, attention vector `a` of shape [2C, 1] (Glorot init),
  `a = [a1 || a2]`; softmax in float32 whatever the compute dtype; ELU output (eq. 12's sigma).
- ISA gate: `F * sigmoid(conv1x1_CtoC(F))` with bias, per pixel and channel.
- ITA and MSR fusion: 1x1 conv 3C -> C, ReLU, 1x1 conv C -> C, gate conv1x1 C -> 1.
- Initialisers are Flax's defaults (LeCun normal kernels, zero biases), not PyTorch's;
  converted PyTorch weights replace them anyway.
- CDecoder (in layers.py, shared with the U-Net baseline): one UpBlock per DownBlock,
  a final 1x1 conv to one logit.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rst2g_jax import layers
from rst2g_jax import unet
from rst2g_jax.layers import CDecoder, ConvBNReLU, DownBlock, DoubleConv, GatedFusion, LayerOptions

LAYER_NORM_EPSILON = 1e-5


def stack_modalities(x: jax.Array) -> jax.Array:
  """[B, S, H, W, 3] -> [B * 3 * S, H, W, 1], the shared encoder's single pass.

  B stays the major axis so that a batch sharded over devices stays sharded through the
  reshapes (a modality-major stack makes XLA gather the whole batch onto every device).
  """
  b, s, h, w, _ = x.shape
  return jnp.moveaxis(x, -1, 1).reshape(b * 3 * s, h, w, 1)


def split_modalities(f: jax.Array, *, batch: int, slab: int) -> tuple[jax.Array, ...]:
  """Inverse of `stack_modalities` on feature maps: (pre, post, res), each [B * S, h, w, c]."""
  f = f.reshape(batch, 3, slab, *f.shape[1:])
  return tuple(f[:, m].reshape(batch * slab, *f.shape[3:]) for m in range(3))


def encoder_widths(cfg) -> tuple[int, ...]:
  """Channel width at every encoder scale: the stem, then one per DownBlock."""
  return (int(cfg.stem_features),) + tuple(int(f) for f in cfg.features)


def image_size(cfg) -> tuple[int, int]:
  size = cfg.image_size
  return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


class MultiHeadSelfAttention(nnx.Module):
  """Eqs. 3-5 with the attention itself in `jax.nn.dot_product_attention` (fused where possible)."""

  def __init__(self, features: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if features % num_heads:
      raise ValueError(f"ViT width {features} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(features, 3 * features, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(features, features, dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    b, n, d = z.shape
    qkv = self.qkv(z).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attended = jax.nn.dot_product_attention(q, k, v)   # [B, N, heads, d_k]
    return self.out(attended.reshape(b, n, d))


class ViTBlock(nnx.Module):
  """Pre-LN transformer block."""

  def __init__(self, features: int, num_heads: int, mlp_ratio: int, *, dtype, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(features, epsilon=LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)
    self.attn = MultiHeadSelfAttention(features, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(features, epsilon=LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(features, mlp_ratio * features, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * features, features, dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    z = z + self.attn(self.norm1(z))
    return z + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(z)), approximate=False))


class ViT(nnx.Module):
  """Tokens from the deepest map (eq. 2), learned position embedding, ViT blocks, final LN."""

  def __init__(self, features: int, num_tokens: int, cfg, *, dtype, rngs: nnx.Rngs):
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, num_tokens, features), jnp.float32))
    self.blocks = nnx.List([
        ViTBlock(features, cfg.vit_heads, cfg.vit_mlp_ratio, dtype=dtype, rngs=rngs)
        for _ in range(cfg.vit_depth)])
    self.norm = nnx.LayerNorm(features, epsilon=LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, d = x.shape
    z = x.reshape(b, h * w, d) + self.pos_embed[...].astype(x.dtype)
    for block in self.blocks:
      z = block(z)
    return self.norm(z).reshape(b, h, w, d)


class CFormerEncoder(nnx.Module):
  """Weight-shared hybrid encoder: stem, DownBlocks with residual projection, ViT.

  Returns the feature map of every scale (stem first); the last one has passed the ViT.
  `use_local=False` makes every 3x3 conv a 1x1 projection; `use_global=False` drops the ViT.
  `remat=True` rematerialises each stage in the backward pass (jax.checkpoint).
  """

  def __init__(self, cfg, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    opts = LayerOptions.from_config(cfg, dtype)
    widths = encoder_widths(cfg)
    k = 3 if cfg.use_local else 1
    self.remat = remat
    self.stem = DoubleConv(1, widths[0], kernel_size=k, opts=opts, rngs=rngs)
    self.downs = nnx.List([
        DownBlock(c_in, c_out, kernel_size=k, opts=opts, rngs=rngs)
        for c_in, c_out in zip(widths[:-1], widths[1:])])
    if cfg.use_global:
      h, w = image_size(cfg)
      stride = 2 ** len(cfg.features)
      self.vit = ViT(widths[-1], (h // stride) * (w // stride), cfg, dtype=dtype, rngs=rngs)
    else:
      self.vit = None

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    feats = [layers.apply_stage(self.stem, x, self.remat)]
    for down in self.downs:
      feats.append(layers.apply_stage(down, feats[-1], self.remat))
    if self.vit is not None:
      feats[-1] = layers.apply_stage(self.vit, feats[-1], self.remat)
    return feats


class MultiScaleRefinement(nnx.Module):
  """MSR (eqs. 6-8): modality-specific ConvBNReLU, concat, channel MLP, spatial gate."""

  def __init__(self, features: int, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.conv_pre = ConvBNReLU(features, features, opts=opts, rngs=rngs)
    self.conv_post = ConvBNReLU(features, features, opts=opts, rngs=rngs)
    self.conv_res = ConvBNReLU(features, features, opts=opts, rngs=rngs)
    self.fusion = GatedFusion(3 * features, features, opts=opts, rngs=rngs)

  def __call__(self, pre: jax.Array, post: jax.Array, res: jax.Array) -> jax.Array:
    cat = jnp.concatenate([self.conv_pre(pre), self.conv_post(post), self.conv_res(res)], -1)
    return self.fusion(cat)


class GraphAttention(nnx.Module):
  """Dense single-head graph attention (Velickovic et al.), eqs. 11-12.

  `e_ij = LeakyReLU_0.2(a1.Wh_i + a2.Wh_j)` by broadcasting (the [Wh_i || Wh_j] concatenation
  is never built), `alpha = softmax_j(e)`, output `ELU(sum_j alpha_ij Wh_j)`.
  Input and output `[G, N, C]`: G independent graphs of N fully connected nodes.
  """

  def __init__(self, features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.features = features
    self.linear = nnx.Linear(features, features, use_bias=False, dtype=dtype, rngs=rngs)
    self.attention = nnx.Param(
        nnx.initializers.glorot_uniform()(rngs.params(), (2 * features, 1), jnp.float32))

  def __call__(self, h: jax.Array) -> jax.Array:
    wh = self.linear(h)
    a = self.attention[...].astype(wh.dtype)
    score_i = (wh @ a[:self.features])[..., 0]      # [G, N]   a1 . Wh_i
    score_j = (wh @ a[self.features:])[..., 0]      # [G, N]   a2 . Wh_j
    e = jax.nn.leaky_relu(score_i[:, :, None] + score_j[:, None, :], negative_slope=0.2)
    alpha = jax.nn.softmax(e.astype(jnp.float32), axis=-1).astype(wh.dtype)
    return jax.nn.elu(alpha @ wh)


class InterSliceAttention(nnx.Module):
  """ISA (eqs. 9-12) for one modality: ConvBNReLU, GAT over nodes, per-pixel channel gate.

  `mode="paper"`: one graph per slice (N = H'W'); `mode="slab"`: one graph per slab
  (N = S*H'*W'), so that attention has edges between slices.
  """

  def __init__(self, features: int, mode: str, *, opts: LayerOptions, rngs: nnx.Rngs):
    if mode not in ("paper", "slab"):
      raise ValueError(f"model.isa.mode must be 'paper' or 'slab'; got {mode!r}")
    self.mode = mode
    self.conv = ConvBNReLU(features, features, opts=opts, rngs=rngs)
    self.gat = GraphAttention(features, dtype=opts.dtype, rngs=rngs)
    self.gate = layers.conv(features, features, 1, opts, rngs)

  def __call__(self, f: jax.Array, slab: int) -> jax.Array:
    f = self.conv(f)                                # [B*S, h, w, C]
    bs, h, w, c = f.shape
    graphs = bs if self.mode == "paper" else bs // slab
    f = self.gat(f.reshape(graphs, -1, c)).reshape(bs, h, w, c)
    return f * nnx.sigmoid(layers.apply_conv(self.gate, f))


class STGE(nnx.Module):
  """Spatiotemporal graph enhancement: ISA per modality (own weights), then ITA."""

  def __init__(self, features: int, cfg, *, opts: LayerOptions, rngs: nnx.Rngs):
    mode = cfg.isa.mode
    self.isa_pre = InterSliceAttention(features, mode, opts=opts, rngs=rngs)
    self.isa_post = InterSliceAttention(features, mode, opts=opts, rngs=rngs)
    self.isa_res = InterSliceAttention(features, mode, opts=opts, rngs=rngs)
    self.ita = GatedFusion(3 * features, features, opts=opts, rngs=rngs)   # eqs. 13-16

  def __call__(self, pre, post, res, slab: int) -> jax.Array:
    cat = jnp.concatenate([self.isa_pre(pre, slab), self.isa_post(post, slab),
                           self.isa_res(res, slab)], axis=-1)
    return self.ita(cat)


class RST2G(nnx.Module):
  """CFormerEncoder -> MSR skips + STGE bottleneck -> CDecoder; ablations per paper Table 4."""

  def __init__(self, cfg, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    opts = LayerOptions.from_config(cfg, dtype)
    widths = encoder_widths(cfg)
    self.dtype = dtype
    self.stride = 2 ** len(cfg.features)
    self.image_size = image_size(cfg) if cfg.use_global else None
    h, w = image_size(cfg)
    if h % self.stride or w % self.stride:
      raise ValueError(f"model.image_size {(h, w)} is not divisible by the encoder stride "
                       f"{self.stride}")
    self.encoder = CFormerEncoder(cfg, dtype=dtype, remat=remat, rngs=rngs)
    self.msr = nnx.List([MultiScaleRefinement(c, opts=opts, rngs=rngs)
                         for c in widths[:-1]]) if cfg.use_msr else None
    self.stge = STGE(widths[-1], cfg, opts=opts, rngs=rngs) if cfg.use_stge else None
    self.decoder = CDecoder(widths, opts=opts, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    layers.check_slab_input(x, name="RST2G", stride=self.stride, image_size=self.image_size)
    b, s, h, w, _ = x.shape
    feats = self.encoder(stack_modalities(x).astype(self.dtype))
    split = functools.partial(split_modalities, batch=b, slab=s)

    if self.msr is not None:
      skips = [msr(*split(f)) for msr, f in zip(self.msr, feats[:-1])]
    else:
      skips = [split(f)[1] for f in feats[:-1]]
    if self.stge is not None:
      bottleneck = self.stge(*split(feats[-1]), slab=s)
    else:
      bottleneck = split(feats[-1])[1]
    logits = self.decoder(bottleneck, skips)
    return logits.reshape(b, s, h, w).astype(jnp.float32)


def build_model(cfg, *, dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs) -> nnx.Module:
  """The network `cfg.name` names ("rst2g" | "unet"), from the `model` config section."""
  if cfg.name == "rst2g":
    return RST2G(cfg, dtype=dtype, remat=remat, rngs=rngs)
  if cfg.name == "unet":
    return unet.UNet2D(cfg, dtype=dtype, remat=remat, rngs=rngs)
  raise ValueError(f"model.name must be 'rst2g' or 'unet'; got {cfg.name!r}")
