"""Grad-CAM against an independent reference (the forward spelled out with the stage output as
an input, jax.grad on it, the rest in numpy), its target and slab choices, input errors, and
the PNG overlay."""
import matplotlib.image
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from rst2g_jax import gradcam, model as model_lib, train_state
from tests import tiny_config

SLAB = 4


def RBG(seed):
  """An "rbg" key: eager parameter init compiles in seconds where threefry takes tens."""
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def rst2g():
  """The tiny RST2G in eval mode and its split (graphs, params, other variables)."""
  model = model_lib.build_model(tiny_config.get_config().model, rngs=nnx.Rngs(RBG(0)))
  graphs, params, rest = train_state.split_model(model)
  model.eval()
  return model, graphs, params, rest


def random_slab(seed=0, slices=SLAB):
  return np.asarray(jax.random.normal(jax.random.key(seed), (slices, 32, 32, 3)), np.float32)


def rst2g_forward(model, x, index, replacement=None):
  """(logits, output of CNN stage `index`), that output replaced by `replacement` if given."""
  b, s, h, w, _ = x.shape
  encoder = model.encoder
  f, feats = model_lib.stack_modalities(x), []
  for i, stage in enumerate([encoder.stem, *encoder.downs]):
    f = stage(f)
    if i == index:
      activation = f
      f = f if replacement is None else replacement
    feats.append(f)
  feats[-1] = encoder.vit(feats[-1])

  def split(f):
    return model_lib.split_modalities(f, batch=b, slab=s)

  skips = [msr(*split(f)) for msr, f in zip(model.msr, feats[:-1])]
  logits = model.decoder(model.stge(*split(feats[-1]), slab=s), skips)
  return logits.reshape(b, s, h, w), activation


def unet_forward(model, x, index, replacement=None):
  b, s, h, w, c = x.shape
  f, feats = x.reshape(b * s, h, w, c), []
  for i, stage in enumerate([model.stem, *model.downs]):
    f = stage(f)
    if i == index:
      activation = f
      f = f if replacement is None else replacement
    feats.append(f)
  return model.decoder(feats[-1], feats[:-1]).reshape(b, s, h, w), activation


def bilinear(x, size):
  """Half-pixel-centre bilinear upsampling of [N, h, w] with edge clamping (PyTorch's
  align_corners=False)."""
  def matrix(n_in, n_out):
    coords = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (coords - lo))
    np.add.at(m, (np.arange(n_out), hi), coords - lo)
    return m
  return np.einsum("Yy,nyx,Xx->nYX", matrix(x.shape[1], size[0]), x, matrix(x.shape[2], size[1]))


def reference_cam(forward, model, slab, index, modality):
  """Grad-CAM with numpy: y = sum of logits over logit > 0, jax.grad w.r.t. the stage output.

  Returns (final maps [S, H, W], weighted activation before ReLU at stage resolution).
  """
  @jax.jit
  def activation_and_grad(x):
    logits, activation = forward(model, x, index)
    tumor = logits > 0
    score = lambda a: jnp.sum(jnp.where(tumor, forward(model, x, index, a)[0], 0.0))
    return tumor, activation, jax.grad(score)(activation)

  tumor, activation, grad = activation_and_grad(jnp.asarray(slab)[None])
  assert np.any(tumor) and not np.all(tumor)
  activation, grad = np.asarray(activation, np.float64), np.asarray(grad, np.float64)
  weighted = np.einsum("nyxc,nc->nyx", activation, grad.mean(axis=(1, 2)))
  if modality is not None:
    per_modality = weighted.reshape(3, SLAB, *weighted.shape[1:])
    weighted = (per_modality.sum(0) if modality == "sum"
                else per_modality[gradcam.MODALITIES.index(modality)])
  cam = bilinear(np.maximum(weighted, 0), slab.shape[1:3])
  peak = cam.max(axis=(1, 2), keepdims=True)
  assert np.any(peak > 0)
  return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0), weighted


@pytest.mark.parametrize("level,modality", [(-1, None), (0, "sum")])
def test_matches_reference(rst2g, level, modality):
  """modality=None is the residual stream."""
  model, graphs, params, rest = rst2g
  slab = random_slab()
  cam = gradcam.grad_cam(graphs.eval, params, rest, slab, level=level, modality=modality)
  modality = modality or "residual"
  index = level % gradcam.num_levels(graphs.eval, params, rest)
  want, weighted = reference_cam(rst2g_forward, model, slab, index, modality)
  assert cam.shape == (SLAB, 32, 32) and cam.dtype == np.float32
  assert cam.min() >= 0 and cam.max() <= 1
  np.testing.assert_allclose(cam, want, atol=1e-5)
  np.testing.assert_allclose(cam.max(axis=(1, 2)), want.max(axis=(1, 2)), atol=1e-6)
  if index == 0:   # the stem is at full resolution: the map is zero exactly where ReLU cut
    np.testing.assert_array_equal(cam == 0, weighted <= 0)
    assert 0 < (cam == 0).mean() < 0.9


def test_tumor_target_falls_back_to_all_voxels(rst2g):
  _, graphs, params, rest = rst2g
  slab = random_slab(2)
  tumor = gradcam.grad_cam(graphs.eval, params, rest, slab, target="tumor")
  every = gradcam.grad_cam(graphs.eval, params, rest, slab, target="all")
  assert np.abs(tumor - every).max() > 0.05          # the prediction restricts the score
  silent = nnx.merge(graphs.eval, params, rest, copy=True)
  silent.decoder.head.bias[...] = jnp.full((1,), -1e3, jnp.float32)   # nothing predicted
  _, silent, _ = nnx.split(silent, nnx.Param, ...)
  np.testing.assert_allclose(
      gradcam.grad_cam(graphs.eval, silent, rest, slab, target="tumor"),
      gradcam.grad_cam(graphs.eval, silent, rest, slab, target="all"), atol=1e-6)


def test_volume_cams_uses_centred_slabs(rst2g):
  _, graphs, params, rest = rst2g
  volume = random_slab(3, slices=7)
  cams = gradcam.volume_cams(graphs.eval, params, rest, volume, [0, 3, 4, 6], SLAB)
  assert sorted(cams) == [0, 3, 4, 6]
  for i, start in ((0, 0), (3, 2), (4, 3), (6, 3)):
    assert gradcam.slab_start(i, 7, SLAB) == start
    np.testing.assert_allclose(
        cams[i], gradcam.grad_cam(graphs.eval, params, rest, volume[start:start + SLAB])[i - start],
        atol=1e-6)
  thin = volume[:3]
  padded = np.concatenate([thin, thin[-1:]])
  np.testing.assert_allclose(gradcam.volume_cams(graphs.eval, params, rest, thin, [2], SLAB)[2],
                             gradcam.grad_cam(graphs.eval, params, rest, padded)[2], atol=1e-6)
  with pytest.raises(ValueError, match=r"slices \[7\] are outside the volume's 7 slices"):
    gradcam.volume_cams(graphs.eval, params, rest, volume, [7], SLAB)


def test_bad_arguments(rst2g):
  _, graphs, params, rest = rst2g
  slab = random_slab()
  with pytest.raises(ValueError, match=r"one slab \[S, H, W, 3\].*\(4, 32, 32, 2\)"):
    gradcam.grad_cam(graphs.eval, params, rest, slab[..., :2])
  with pytest.raises(ValueError, match="level=3 is out of range .* 3 CNN stages"):
    gradcam.grad_cam(graphs.eval, params, rest, slab, level=3)
  with pytest.raises(ValueError, match="modality='ktrans'"):
    gradcam.grad_cam(graphs.eval, params, rest, slab, modality="ktrans")
  with pytest.raises(ValueError, match="target='background'"):
    gradcam.grad_cam(graphs.eval, params, rest, slab, target="background")


def test_unet_matches_reference():
  cfg = tiny_config.get_config().model
  cfg.name = "unet"
  model = model_lib.build_model(cfg, rngs=nnx.Rngs(RBG(1)))
  graphs, params, rest = train_state.split_model(model)
  model.eval()
  slab = random_slab(4)
  cam = gradcam.grad_cam(graphs.eval, params, rest, slab, level=-1)
  want, _ = reference_cam(unet_forward, model, slab, len(model.downs), None)
  np.testing.assert_allclose(cam, want, atol=1e-5)
  with pytest.raises(ValueError, match="U-Net .* modality=None"):
    gradcam.grad_cam(graphs.eval, params, rest, slab, modality="residual")


def test_overlay_png(tmp_path):
  image = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (32, 1))
  cam = np.zeros((32, 48), np.float32)
  cam[:, :24] = 1.0
  mask = np.zeros((32, 48), bool)
  mask[10:20, 30:40] = True
  path = gradcam.overlay_png(image, cam, str(tmp_path / "out" / "slice.png"), mask=mask,
                             title="case_007 slice 3")
  png = matplotlib.image.imread(path)
  assert png.shape[:2] == (32 * 6, 48 * 6)         # longer side scaled to >= 256 pixels
  hot, cold = png[150, 60, :3], png[150, 200, :3]  # bottom rows, clear of title and contour
  assert hot[0] > hot[2] + 0.15 and cold[2] > cold[0] + 0.15
  small = gradcam.overlay_png(image, cam, str(tmp_path / "s.png"), scale=1)
  assert matplotlib.image.imread(small).shape[:2] == (32, 48)
  with pytest.raises(ValueError, match="same shape"):
    gradcam.overlay_png(image, cam[:, :10], str(tmp_path / "bad.png"))
