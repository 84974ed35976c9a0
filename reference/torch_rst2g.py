"""A PyTorch reference of RST2G (NCHW, torch.nn), written from the paper's Methods and DESIGN.md §4.

It is a second reading of the equations, used by the parity tests and benchmarks only, and the
layout `rst2g_jax.convert_torch` converts from and to. Module and attribute names follow the
Flax model so that a state_dict key is the NNX path with PyTorch's leaf names
(`weight`, `running_mean`, ...); multi-head attention is `nn.MultiheadAttention` (packed
`in_proj_weight`), the layout PyTorch ViTs use.

Input `[B, S, 3, H, W]` (channels pre, post, residual), output `[B, S, H, W]` logits.
`model.train()` normalises with batch statistics and updates the running ones the PyTorch way
(momentum 1 - cfg.bn_momentum, unbiased running variance); `model.eval()` uses the running ones.

Where this reading differs in form (not in value) from the Flax code:
- ISA's recalibration is written as the paper words it: permute [B, C, H, W] to
  [(B*H), C, W], 1x1 convolution, sigmoid, multiply, permute back.
- The boundary loss applies Sobel to p and to g separately (eq. 20 as printed) with
  replicate padding (equal to half-sample symmetric padding for a 1-pixel border).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _widths(cfg) -> tuple[int, ...]:
  return (int(cfg.stem_features),) + tuple(int(f) for f in cfg.features)


def _image_size(cfg) -> tuple[int, int]:
  size = cfg.image_size
  return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def _bn(cfg, features: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(features, eps=float(cfg.bn_epsilon), momentum=1.0 - float(cfg.bn_momentum))


class ConvBNReLU(nn.Module):
  """Eq. 1: conv (no bias, BN absorbs it) -> BN -> ReLU."""

  def __init__(self, cfg, c_in: int, c_out: int, kernel_size: int = 3):
    super().__init__()
    self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
    self.bn = _bn(cfg, c_out)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class DoubleConv(nn.Module):
  def __init__(self, cfg, c_in: int, c_out: int, kernel_size: int = 3):
    super().__init__()
    self.first = ConvBNReLU(cfg, c_in, c_out, kernel_size)
    self.second = ConvBNReLU(cfg, c_out, c_out, kernel_size)

  def forward(self, x):
    return self.second(self.first(x))


class DownBlock(nn.Module):
  """maxpool 2 -> DoubleConv, plus a 1x1 projection of the pooled input (the residual)."""

  def __init__(self, cfg, c_in: int, c_out: int, kernel_size: int = 3, residual: bool = True):
    super().__init__()
    self.convs = DoubleConv(cfg, c_in, c_out, kernel_size)
    self.proj = nn.Conv2d(c_in, c_out, 1) if residual else None

  def forward(self, x):
    x = F.max_pool2d(x, 2)
    y = self.convs(x)
    return y if self.proj is None else y + self.proj(x)


class ViTBlock(nn.Module):
  """Pre-LN block: z + MHSA(LN z) (eqs. 3-5), z + MLP(LN z) with exact GELU."""

  def __init__(self, dim: int, heads: int, mlp_ratio: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-5)
    self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
    self.norm2 = nn.LayerNorm(dim, eps=1e-5)
    self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
    self.mlp_out = nn.Linear(mlp_ratio * dim, dim)

  def forward(self, z):
    y = self.norm1(z)
    z = z + self.attn(y, y, y, need_weights=False)[0]
    return z + self.mlp_out(F.gelu(self.mlp_in(self.norm2(z))))


class ViT(nn.Module):
  """Eq. 2 tokens (N = H'W', D = C) + learned position embedding, blocks, final LayerNorm."""

  def __init__(self, dim: int, num_tokens: int, cfg):
    super().__init__()
    self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
    self.blocks = nn.ModuleList(
        [ViTBlock(dim, int(cfg.vit_heads), int(cfg.vit_mlp_ratio)) for _ in range(cfg.vit_depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-5)

  def forward(self, x):
    b, d, h, w = x.shape
    z = x.flatten(2).transpose(1, 2) + self.pos_embed
    for block in self.blocks:
      z = block(z)
    return self.norm(z).transpose(1, 2).reshape(b, d, h, w)


class CFormerEncoder(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    widths = _widths(cfg)
    k = 3 if cfg.use_local else 1
    self.stem = DoubleConv(cfg, 1, widths[0], k)
    self.downs = nn.ModuleList(
        [DownBlock(cfg, a, b, k) for a, b in zip(widths[:-1], widths[1:])])
    if cfg.use_global:
      h, w = _image_size(cfg)
      stride = 2 ** len(cfg.features)
      self.vit = ViT(widths[-1], (h // stride) * (w // stride), cfg)
    else:
      self.vit = None

  def forward(self, x):
    feats = [self.stem(x)]
    for down in self.downs:
      feats.append(down(feats[-1]))
    if self.vit is not None:
      feats[-1] = self.vit(feats[-1])
    return feats


class GatedFusion(nn.Module):
  """Channel MLP (eq. 7 / 14), A = sigmoid(conv1x1 -> 1 channel) (eq. 8 / 15), F * A."""

  def __init__(self, c_in: int, c: int):
    super().__init__()
    self.mlp_in = nn.Conv2d(c_in, c, 1)
    self.mlp_out = nn.Conv2d(c, c, 1)
    self.gate = nn.Conv2d(c, 1, 1)

  def forward(self, x):
    fused = self.mlp_out(F.relu(self.mlp_in(x)))
    return fused * torch.sigmoid(self.gate(fused))


class MultiScaleRefinement(nn.Module):
  """Eqs. 6-8."""

  def __init__(self, cfg, c: int):
    super().__init__()
    self.conv_pre = ConvBNReLU(cfg, c, c)
    self.conv_post = ConvBNReLU(cfg, c, c)
    self.conv_res = ConvBNReLU(cfg, c, c)
    self.fusion = GatedFusion(3 * c, c)

  def forward(self, pre, post, res):
    return self.fusion(torch.cat([self.conv_pre(pre), self.conv_post(post), self.conv_res(res)], 1))


class GraphAttention(nn.Module):
  """Eqs. 11-12, one head over dense graphs [G, N, C]; a = [a1 || a2] as in Velickovic et al."""

  def __init__(self, c: int):
    super().__init__()
    self.c = c
    self.linear = nn.Linear(c, c, bias=False)
    self.attention = nn.Parameter(torch.empty(2 * c, 1))
    nn.init.xavier_uniform_(self.attention, gain=1.414)

  def forward(self, h):
    wh = self.linear(h)                                    # [G, N, C]
    # a^T [Wh_i || Wh_j] = a1 . Wh_i + a2 . Wh_j
    e = wh @ self.attention[:self.c] + (wh @ self.attention[self.c:]).transpose(1, 2)
    alpha = torch.softmax(F.leaky_relu(e, 0.2), dim=-1)    # over j
    return F.elu(alpha @ wh)


class InterSliceAttention(nn.Module):
  """Eqs. 9-12 and the batch-wise recalibration, one modality."""

  def __init__(self, cfg, c: int):
    super().__init__()
    if cfg.isa.mode not in ("paper", "slab"):
      raise ValueError(f"model.isa.mode must be 'paper' or 'slab'; got {cfg.isa.mode!r}")
    self.mode = cfg.isa.mode
    self.conv = ConvBNReLU(cfg, c, c)
    self.gat = GraphAttention(c)
    self.gate = nn.Conv2d(c, c, 1)

  def forward(self, f, slab: int):
    f = self.conv(f)                                       # [B*S, C, h, w]
    n, c, h, w = f.shape
    if self.mode == "paper":                               # a graph per slice, N = h*w
      nodes = f.flatten(2).transpose(1, 2)
      f = self.gat(nodes).transpose(1, 2).reshape(n, c, h, w)
    else:                                                  # a graph per slab, N = S*h*w
      nodes = f.reshape(n // slab, slab, c, h * w).permute(0, 1, 3, 2).reshape(n // slab, -1, c)
      out = self.gat(nodes).reshape(n // slab, slab, h * w, c).permute(0, 1, 3, 2)
      f = out.reshape(n, c, h, w)
    # Batch-wise recalibration as the paper words it: [(B*H), C, W], 1x1 conv, sigmoid.
    rows = f.permute(0, 2, 1, 3).reshape(n * h, c, w, 1)
    rows = rows * torch.sigmoid(self.gate(rows))
    return rows.reshape(n, h, c, w).permute(0, 2, 1, 3)


class STGE(nn.Module):
  def __init__(self, cfg, c: int):
    super().__init__()
    self.isa_pre = InterSliceAttention(cfg, c)
    self.isa_post = InterSliceAttention(cfg, c)
    self.isa_res = InterSliceAttention(cfg, c)
    self.ita = GatedFusion(3 * c, c)                       # eqs. 13-16

  def forward(self, pre, post, res, slab: int):
    return self.ita(torch.cat([self.isa_pre(pre, slab), self.isa_post(post, slab),
                               self.isa_res(res, slab)], 1))


class UpBlock(nn.Module):
  def __init__(self, cfg, c_in: int, c_out: int):
    super().__init__()
    self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
    self.convs = DoubleConv(cfg, 2 * c_out, c_out)

  def forward(self, x, skip):
    return self.convs(torch.cat([self.up(x), skip], 1))


class CDecoder(nn.Module):
  def __init__(self, cfg, widths):
    super().__init__()
    self.ups = nn.ModuleList(
        [UpBlock(cfg, widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1))])
    self.head = nn.Conv2d(widths[0], 1, 1)

  def forward(self, x, skips):
    for up, skip in zip(self.ups, reversed(skips)):
      x = up(x, skip)
    return self.head(x)[:, 0]


class RST2G(nn.Module):
  """[B, S, 3, H, W] -> [B, S, H, W] logits; ablation switches from the same `model` config."""

  def __init__(self, cfg):
    super().__init__()
    widths = _widths(cfg)
    self.encoder = CFormerEncoder(cfg)
    self.msr = nn.ModuleList(
        [MultiScaleRefinement(cfg, c) for c in widths[:-1]]) if cfg.use_msr else None
    self.stge = STGE(cfg, widths[-1]) if cfg.use_stge else None
    self.decoder = CDecoder(cfg, widths)

  def forward(self, x):
    b, s, _, h, w = x.shape
    # One pass of the shared encoder over pre, post and res stacked on the batch axis.
    stacked = x.permute(0, 2, 1, 3, 4).reshape(b * 3 * s, 1, h, w)   # batch-major, as the JAX model
    feats = self.encoder(stacked)

    def split(f):
      f = f.reshape(b, 3, s, *f.shape[1:])
      return tuple(f[:, m].reshape(b * s, *f.shape[3:]) for m in range(3))

    if self.msr is not None:
      skips = [msr(*split(f)) for msr, f in zip(self.msr, feats[:-1])]
    else:
      skips = [split(f)[1] for f in feats[:-1]]
    if self.stge is not None:
      bottleneck = self.stge(*split(feats[-1]), slab=s)
    else:
      bottleneck = split(feats[-1])[1]
    return self.decoder(bottleneck, skips).reshape(b, s, h, w)


class UNet2D(nn.Module):
  """The U-Net baseline: the three inputs as channels, plain DownBlocks, same decoder."""

  def __init__(self, cfg):
    super().__init__()
    widths = _widths(cfg)
    self.stem = DoubleConv(cfg, 3, widths[0])
    self.downs = nn.ModuleList(
        [DownBlock(cfg, a, b, residual=False) for a, b in zip(widths[:-1], widths[1:])])
    self.decoder = CDecoder(cfg, widths)

  def forward(self, x):
    b, s, c, h, w = x.shape
    feats = [self.stem(x.reshape(b * s, c, h, w))]
    for down in self.downs:
      feats.append(down(feats[-1]))
    return self.decoder(feats[-1], feats[:-1]).reshape(b, s, h, w)


def build_reference(cfg) -> nn.Module:
  """The PyTorch network `cfg.name` names, from the same `model` config section as the JAX one."""
  if cfg.name == "rst2g":
    return RST2G(cfg)
  if cfg.name == "unet":
    return UNet2D(cfg)
  raise ValueError(f"model.name must be 'rst2g' or 'unet'; got {cfg.name!r}")


# -- loss (eqs. 17-20) -----------------------------------------------------------------------
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _sobel(images):
  """(gx, gy) of every slice of [..., H, W], replicate-padded."""
  shape = images.shape
  x = F.pad(images.reshape(-1, 1, *shape[-2:]), (1, 1, 1, 1), mode="replicate")
  kx = torch.tensor(_SOBEL_X, dtype=images.dtype, device=images.device)[None, None]
  gx = F.conv2d(x, kx)
  gy = F.conv2d(x, kx.transpose(2, 3))
  return gx.reshape(shape), gy.reshape(shape)


def rst2g_loss(logits, targets, *, bce_weight=0.5, boundary_weight=0.2, dice_eps=1.0):
  """(total, {"dice", "bce", "boundary"}): soft Dice over the batch + lambda BCE + beta Boundary."""
  p = torch.sigmoid(logits)
  g = targets.to(logits.dtype)
  dice = 1.0 - (2.0 * (p * g).sum() + dice_eps) / (p.sum() + g.sum() + dice_eps)
  bce = F.binary_cross_entropy_with_logits(logits, g)
  pgx, pgy = _sobel(p)
  ggx, ggy = _sobel(g)
  boundary = ((pgx - ggx).abs() + (pgy - ggy).abs()).mean()
  total = dice + bce_weight * bce + boundary_weight * boundary
  return total, {"dice": dice, "bce": bce, "boundary": boundary}
