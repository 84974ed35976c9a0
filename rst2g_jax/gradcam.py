"""Grad-CAM (Selvaraju et al. 2017) of the convolutional encoder, the maps of paper Fig. 8.

For a slab `[S, H, W, 3]` the score `y` is the sum of the model's logits over the voxels it
predicts as tumor (logit > 0; every voxel when there is none), A is the output of one CNN stage
of the encoder (`level` indexes [stem, DownBlock 1, ..., DownBlock L]; -1, the default, is the
deepest one, the map that enters the ViT), and per slice

  alpha_k = mean_{h,w} dy/dA_k,   cam = ReLU(sum_k alpha_k A_k),

upsampled bilinearly to H x W and divided by its maximum (all zero when the maximum is 0).

RST2G runs one shared encoder over the pre, post and residual images (`stack_modalities`), so
every stage has one activation per modality. `modality` picks whose weighted activation makes
the map: "residual" (the default for RST2G: the enhancement stream), "pre", "post", or "sum" (the three
weighted activations summed before the ReLU, the whole encoder's contribution). The U-Net
baseline encodes the three channels together; it takes `modality=None`.

The tap: inside the jitted function the merged model's stage is swapped for a wrapper that
records A and adds a zero `probe` to it, so dy/dA = dy/dprobe at probe = 0; model.py is
untouched. The model runs in eval mode (BatchNorm running statistics), without remat.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rst2g_jax import model as model_lib

MODALITIES = ("pre", "post", "residual")
TARGETS = ("tumor", "all")


class _TappedStage(nnx.Module):
  """An encoder stage whose output A is kept in `activation` and returned as A + probe."""

  def __init__(self, stage: nnx.Module, probe: jax.Array | None):
    self.stage = stage
    self.probe = probe

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.stage(x)
    self.activation = nnx.Intermediate(a)
    return a if self.probe is None else a + self.probe


def _encoder(model: nnx.Module) -> nnx.Module:
  """The module that holds `stem`, `downs` and `remat` (RST2G's encoder, or the U-Net)."""
  if isinstance(model, model_lib.RST2G):
    return model.encoder
  if isinstance(model, model_lib.unet.UNet2D):
    return model
  raise TypeError(f"Grad-CAM supports RST2G and UNet2D; got {type(model).__name__}")


def num_levels(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State) -> int:
  """How many CNN stages `level` can pick from (the stem plus one per DownBlock)."""
  return 1 + len(_encoder(nnx.merge(graphdef, params, model_state)).downs)


def _level_index(level: int, count: int) -> int:
  if not -count <= level < count:
    raise ValueError(f"level={level} is out of range for an encoder with {count} CNN stages "
                     f"(expected {-count} .. {count - 1})")
  return level % count


def _tap(model: nnx.Module, index: int, probe: jax.Array | None) -> _TappedStage:
  """Swaps stage `index` of the (merged, traced) model for a `_TappedStage`."""
  encoder = _encoder(model)
  encoder.remat = False
  if index == 0:
    tapped = encoder.stem = _TappedStage(encoder.stem, probe)
  else:
    tapped = encoder.downs[index - 1] = _TappedStage(encoder.downs[index - 1], probe)
  return tapped


def target_score(logits: jax.Array, target: str) -> jax.Array:
  """y: the logits summed over the predicted tumor (logit > 0; all voxels when none), or all."""
  if target == "all":
    return jnp.sum(logits)
  tumor = jax.lax.stop_gradient(logits > 0)
  tumor = jnp.where(jnp.any(tumor), tumor, True)
  return jnp.sum(jnp.where(tumor, logits, 0.0))


def _activation_and_gradient(graphdef, params, model_state, slab, *, index: int, target: str):
  """(A, dy/dA), float32 `[N, h, w, C]`, N the encoder's batch (3 * S for RST2G, S for U-Net)."""
  def forward(probe):
    model = nnx.merge(graphdef, params, model_state)
    model.eval()
    tapped = _tap(model, index, probe)
    logits = model(slab[None])
    return target_score(logits, target), tapped.activation[...]

  shape = jax.eval_shape(forward, None)[1]
  probe = jnp.zeros(shape.shape, shape.dtype)
  (_, activation), grad = jax.value_and_grad(forward, has_aux=True)(probe)
  return activation.astype(jnp.float32), grad.astype(jnp.float32)


def weighted_activation(activation: jax.Array, grad: jax.Array) -> jax.Array:
  """sum_k alpha_k A_k per image, alpha_k = mean_{h,w} dy/dA_k: `[N, h, w, C]` -> `[N, h, w]`."""
  alpha = jnp.mean(grad, axis=(1, 2), keepdims=True)
  return jnp.sum(alpha * activation, axis=-1)


def normalise_maps(cam: jax.Array, size: tuple[int, int]) -> jax.Array:
  """ReLU, bilinear upsampling to `size`, then each map divided by its max (0 stays 0)."""
  cam = jnp.maximum(cam, 0.0)
  cam = jnp.maximum(jax.image.resize(cam, (cam.shape[0], *size), "bilinear"), 0.0)
  peak = jnp.max(cam, axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "index", "target", "modality"))
def _grad_cam(graphdef, params, model_state, slab, *, index, target, modality):
  s, h, w, _ = slab.shape
  activation, grad = _activation_and_gradient(graphdef, params, model_state, slab,
                                              index=index, target=target)
  cam = weighted_activation(activation, grad)
  if modality is not None:
    per_modality = model_lib.split_modalities(cam, batch=1, slab=s)   # (pre, post, residual)
    cam = sum(per_modality) if modality == "sum" else per_modality[MODALITIES.index(modality)]
  return normalise_maps(cam, (h, w))


def _resolve_modality(model: nnx.Module, modality: str | None) -> str | None:
  """None means the model's own choice: "residual" for RST2G, none for the U-Net."""
  if not isinstance(model, model_lib.RST2G):
    if modality is not None:
      raise ValueError(f"modality={modality!r}; the U-Net encodes the three channels together "
                       "and takes modality=None")
    return None
  modality = "residual" if modality is None else modality
  if modality not in MODALITIES + ("sum",):
    raise ValueError(f"modality={modality!r}; expected one of {MODALITIES + ('sum',)}")
  return modality


def grad_cam(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
             slab: np.ndarray, *, level: int = -1, target: str = "tumor",
             modality: str | None = None) -> np.ndarray:
  """Grad-CAM maps `[S, H, W]` float32 in [0, 1] of one normalised slab `[S, H, W, 3]`.

  `level` indexes the CNN stages [stem, DownBlock 1, ..., DownBlock L] (-1: the deepest);
  `target` "tumor" or "all"; `modality` "residual" (what None means for RST2G), "pre",
  "post" or "sum" (module docstring); the U-Net takes None only.
  One jitted function per (graph, level, target, modality, slab shape).
  """
  slab = np.asarray(slab, np.float32)
  if slab.ndim != 4 or slab.shape[-1] != 3:
    raise ValueError(f"Grad-CAM expects one slab [S, H, W, 3] (pre, post, post-pre); "
                     f"got {slab.shape}")
  if target not in TARGETS:
    raise ValueError(f"target={target!r}; expected one of {TARGETS}")
  model = nnx.merge(graphdef, params, model_state)
  modality = _resolve_modality(model, modality)
  index = _level_index(level, 1 + len(_encoder(model).downs))
  cam = _grad_cam(graphdef, params, model_state, jnp.asarray(slab), index=index, target=target,
                  modality=modality)
  return np.asarray(cam, np.float32)


def slab_start(slice_index: int, num_slices: int, slab: int) -> int:
  """First slice of the slab that holds `slice_index` as centrally as the volume allows."""
  return int(min(max(slice_index - (slab - 1) // 2, 0), max(num_slices - slab, 0)))


def volume_cams(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                volume: np.ndarray, slices, slab: int, **kwargs) -> dict[int, np.ndarray]:
  """{slice: map [H, W]} for the requested slices of a normalised volume `[S_total, H, W, 3]`.

  Each slice's map comes from the slab centred on it where possible (`slab_start`), so it
  sees the same neighbours it had in sliding-slab inference; slices that share a slab share
  one Grad-CAM pass. A volume thinner than a slab is edge-padded, as inference does.
  `kwargs` go to `grad_cam` (level, target, modality).
  """
  volume = np.asarray(volume, np.float32)
  if volume.ndim != 4 or volume.shape[-1] != 3:
    raise ValueError(f"Grad-CAM expects a volume [S, H, W, 3] (pre, post, post-pre); "
                     f"got {volume.shape}")
  num_slices = volume.shape[0]
  bad = [i for i in slices if not 0 <= int(i) < num_slices]
  if bad:
    raise ValueError(f"slices {bad} are outside the volume's {num_slices} slices")
  if num_slices < slab:
    volume = np.concatenate([volume, np.repeat(volume[-1:], slab - num_slices, axis=0)])
  by_start: dict[int, list[int]] = {}
  for i in slices:
    by_start.setdefault(slab_start(int(i), num_slices, slab), []).append(int(i))
  cams = {}
  for start, members in sorted(by_start.items()):
    maps = grad_cam(graphdef, params, model_state, volume[start:start + slab], **kwargs)
    for i in members:
      cams[i] = maps[i - start]
  return cams


def overlay_png(image_slice: np.ndarray, cam: np.ndarray, path: str, *,
                mask: np.ndarray | None = None, title: str | None = None,
                alpha: float = 0.4, scale: int | None = None) -> str:
  """Writes `path`: the slice in grey (1st-99th percentile window), the map in 'jet' on top.

  `mask` (predicted tumor) is drawn as a white contour, `title` (a de-identified study
  name, never a patient identifier) in the top-left corner. The PNG is
  `[H * scale, W * scale]` pixels; `scale` defaults to the smallest integer that makes the
  longer side at least 256 pixels. Returns `path`.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  image_slice, cam = np.asarray(image_slice, np.float32), np.asarray(cam, np.float32)
  if image_slice.ndim != 2 or cam.shape != image_slice.shape:
    raise ValueError(f"overlay_png expects a 2-D slice and a map of the same shape; got "
                     f"{image_slice.shape} and {cam.shape}")
  if mask is not None and np.shape(mask) != image_slice.shape:
    raise ValueError(f"overlay_png: mask {np.shape(mask)} does not match the slice "
                     f"{image_slice.shape}")
  h, w = image_slice.shape
  if scale is None:
    scale = max(1, -(-256 // max(h, w)))
  dpi = 100
  fig = Figure(figsize=(w * scale / dpi, h * scale / dpi), dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
  ax.set_axis_off()
  low, high = np.percentile(image_slice, [1, 99])
  ax.imshow(image_slice, cmap="gray", vmin=low, vmax=max(high, low + 1e-6),
            interpolation="nearest")
  ax.imshow(np.clip(cam, 0.0, 1.0), cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha,
            interpolation="bilinear")
  if mask is not None and np.any(mask) and not np.all(mask):
    ax.contour(np.asarray(mask, np.float32), levels=[0.5], colors="white", linewidths=1.0)
  if title:
    ax.text(0.01, 0.99, title, transform=ax.transAxes, va="top", ha="left", color="white",
            fontsize=8, bbox=dict(facecolor="black", alpha=0.6, pad=2, edgecolor="none"))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path
