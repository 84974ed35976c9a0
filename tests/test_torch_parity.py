"""The Flax model against the PyTorch reference (reference/torch_rst2g.py), and weight conversion.

Float32 on CPU. Unless a test says otherwise, two arrays agree when
  max|jax - torch| <= 1e-4 * max|torch|        (normwise relative error, `assert_close`),
i.e. the differences are float32 rounding in different summation orders, not a different formula.
Both sides share weights through `convert_torch`, so these tests check the conversion table too.
"""
import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from configs import nact, synthetic  # noqa: E402
from reference import torch_rst2g as ref  # noqa: E402
from rst2g_jax import checkpointing, convert_torch, losses  # noqa: E402
from rst2g_jax import model as model_lib  # noqa: E402
from rst2g_jax import train_state as ts  # noqa: E402
from tests import tiny_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-4
torch.set_num_threads(1)


# -- helpers ------------------------------------------------------------------------------
def synthetic_config(**overrides):
  """configs/synthetic.py's model (widths 8..64, ViT depth 2, 2 heads) on 32x32 slices."""
  cfg = synthetic.get_config().model
  cfg.image_size = (32, 32)
  cfg.update(overrides)
  return cfg


def narrow_paper_config(**overrides):
  """The paper's structure (5 scales, ViT depth 6, 4 heads) with narrow widths on 64x64."""
  cfg = nact.get_config().model
  cfg.update(dict(image_size=(64, 64), stem_features=4, features=(8, 8, 16, 16)))
  cfg.update(overrides)
  return cfg


CONFIGS = {
    "synthetic": lambda: synthetic_config(),
    "narrow-paper": lambda: narrow_paper_config(),
}


def assert_close(actual, expected, rtol=RTOL, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = max(np.abs(expected).max(), 1e-30)
  err = np.abs(actual - expected).max() / scale
  assert err <= rtol, f"{what}: normwise relative error {err:.3g} > {rtol:g}"


def randomize(model, seed):
  """Fills every variable with NumPy draws (kernels ~ N(0, 1/fan_in)); non-trivial biases,
  BatchNorm affine parameters and running statistics. Fast: no JAX initialisers run."""
  rng = np.random.default_rng(seed)
  updates = []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape = tuple(var.shape)
    if path[-1] == "var":
      value = rng.uniform(0.5, 1.5, shape)
    elif path[-1] in ("bias", "mean"):
      value = 0.1 * rng.standard_normal(shape)
    elif path[-1] == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif path[-1] == "pos_embed":
      value = 0.02 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    updates.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  nnx.update(model, nnx.State.from_flat_path(updates))
  return model


def random_model(cfg, seed):
  """The model of `cfg` with `randomize`d weights, built without running its initialisers."""
  abstract = nnx.eval_shape(lambda: model_lib.build_model(cfg, rngs=nnx.Rngs(0)))
  return randomize(abstract, seed)


def torch_state(model):
  return {k: torch.from_numpy(v) for k, v in convert_torch.nnx_to_torch(model).items()}


def make_pair(cfg, seed=0):
  jm = random_model(cfg, seed)
  tm = ref.build_reference(cfg)
  tm.load_state_dict(torch_state(jm))
  return jm, tm


def slabs(cfg, b=2, s=2, seed=0):
  h, w = model_lib.image_size(cfg)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, s, h, w, 3)).astype(np.float32)
  y = (rng.uniform(size=(b, s, h, w)) > 0.7).astype(np.float32)
  return x, y


def to_torch(a):
  """NHWC -> NCHW for feature maps, [B, S, H, W, 3] -> [B, S, 3, H, W] for model inputs."""
  a = torch.from_numpy(np.array(a, np.float32))
  if a.ndim == 4:
    return a.permute(0, 3, 1, 2)
  if a.ndim == 5:
    return a.permute(0, 1, 4, 2, 3)
  return a


def nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def set_mode(jm, tm, train):
  (jm.train() if train else jm.eval())
  (tm.train() if train else tm.eval())


@nnx.jit
def jax_parts(jm, x):
  """{part: (its inputs, its output)} for every part of RST2G, chained as RST2G.__call__ does.

  One compiled program (eager JAX would compile every op of every shape separately).
  """
  b, s, h, w, _ = x.shape
  out = {}

  def run(name, fn, *inputs):
    out[name] = (inputs, fn(*inputs))
    return out[name][1]

  f = run("encoder.stem", jm.encoder.stem, model_lib.stack_modalities(jnp.asarray(x)))
  feats = [f]
  for i, down in enumerate(jm.encoder.downs):
    feats.append(run(f"encoder.downs.{i}", down, feats[-1]))
  deep = run("encoder.vit", jm.encoder.vit, feats[-1])

  def split(f):
    return model_lib.split_modalities(f, batch=b, slab=s)

  skips = [run(f"msr.{i}", msr, *split(f)) for i, (msr, f) in enumerate(zip(jm.msr, feats))]
  pre, post, res = split(deep)
  for name, f in (("pre", pre), ("post", post), ("res", res)):
    run(f"stge.isa_{name}", lambda t, n=name: getattr(jm.stge, f"isa_{n}")(t, slab=s), f)
  run("stge.isa_post.gat", jm.stge.isa_post.gat, post.reshape(b * s, -1, post.shape[-1]))
  bottleneck = run("stge", lambda *a: jm.stge(*a, slab=s), pre, post, res)
  run("decoder", lambda z, *k: jm.decoder(z, list(k)), bottleneck, *skips)
  run("model", jm, x)
  return out


def torch_parts(tm, slab):
  """{part: (torch callable, output is a feature map)} matching `jax_parts`."""
  parts = {"encoder.stem": (tm.encoder.stem, True), "encoder.vit": (tm.encoder.vit, True),
           "stge.isa_post.gat": (tm.stge.isa_post.gat, False),
           "stge": (lambda *a: tm.stge(*a, slab=slab), True),
           "decoder": (lambda z, *k: tm.decoder(z, list(k)), False), "model": (tm, False)}
  for i, down in enumerate(tm.encoder.downs):
    parts[f"encoder.downs.{i}"] = (down, True)
  for i, msr in enumerate(tm.msr):
    parts[f"msr.{i}"] = (msr, True)
  for name in ("pre", "post", "res"):
    parts[f"stge.isa_{name}"] = (lambda t, m=getattr(tm.stge, f"isa_{name}"): m(t, slab=slab),
                                 True)
  return parts


@nnx.jit
def jax_forward(jm, x):
  return jm(x)


# -- every module and the whole model -------------------------------------------------------
@pytest.mark.parametrize("train", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_module_matches_reference(name, train):
  """Each part on the same input (so errors do not accumulate), then the whole model."""
  cfg = CONFIGS[name]()
  jm, tm = make_pair(cfg)
  x, _ = slabs(cfg)
  set_mode(jm, tm, train)
  outputs = jax_parts(jm, jnp.asarray(x))
  parts = torch_parts(tm, slab=x.shape[1])
  assert set(outputs) == set(parts) and len(parts) == 2 * len(cfg.features) + 9
  for part, (inputs, actual) in outputs.items():
    fn, is_map = parts[part]
    expected = fn(*[to_torch(a) for a in inputs])
    expected = nhwc(expected) if is_map else expected.detach().numpy()
    assert_close(actual, expected, what=f"{name} {part}")


@pytest.mark.parametrize("overrides", [
    dict(isa={"mode": "slab"}), dict(use_local=False), dict(use_global=False),
    dict(use_msr=False), dict(use_stge=False), dict(name="unet")],
    ids=["isa_slab", "no_cfe_l", "no_cfe_g", "no_msr", "no_stge", "unet"])
def test_ablations_match_reference(overrides):
  cfg = synthetic_config(**overrides)
  jm, tm = make_pair(cfg, seed=3)
  x, _ = slabs(cfg, seed=3)
  for train in (True, False):   # train, then eval with the running statistics it updated
    set_mode(jm, tm, train)
    assert_close(jax_forward(jm, jnp.asarray(x)), tm(to_torch(x)).detach().numpy(),
                 what=f"{overrides} train={train}")


def _bn_batch_sizes(tm, x):
  """Elements per channel each torch BatchNorm normalised over in one forward."""
  sizes, hooks = {}, []
  for name, mod in tm.named_modules():
    if isinstance(mod, torch.nn.BatchNorm2d):
      hooks.append(mod.register_forward_hook(
          lambda m, i, o, name=name: sizes.__setitem__(name, i[0].numel() // i[0].shape[1])))
  with torch.no_grad():
    tm(to_torch(x))
  for h in hooks:
    h.remove()
  return sizes


@functools.lru_cache(maxsize=None)
def _running_stats_after_one_train_forward(name, unbiased=True):
  cfg = CONFIGS[name]()
  cfg.bn_unbiased_running_var = unbiased
  jm, tm = make_pair(cfg, seed=1)
  x, _ = slabs(cfg, seed=1)
  set_mode(jm, tm, True)
  before = {k: v.numpy().copy() for k, v in tm.state_dict().items() if "running_var" in k}
  jax_forward(jm, jnp.asarray(x))
  sizes = _bn_batch_sizes(tm, x)
  return convert_torch.nnx_to_torch(jm), {k: v.numpy() for k, v in tm.state_dict().items()}, \
      before, sizes


@pytest.mark.parametrize("name", ["synthetic", "narrow-paper"])
def test_running_mean_update_matches_pytorch(name):
  """Flax momentum 0.9 == PyTorch momentum 0.1: new = 0.9 old + 0.1 batch mean."""
  jax_sd, torch_sd, _, sizes = _running_stats_after_one_train_forward(name)
  assert len(sizes) > 10
  for bn in sizes:
    key = f"{bn}.running_mean"
    assert_close(jax_sd[key], torch_sd[key], what=key)


@pytest.mark.parametrize("name", ["synthetic", "narrow-paper"])
def test_running_var_update_matches_pytorch(name):
  """layers.BatchNorm accumulates the unbiased batch variance, as torch.nn.BatchNorm2d does."""
  jax_sd, torch_sd, _, sizes = _running_stats_after_one_train_forward(name)
  for bn in sizes:
    key = f"{bn}.running_var"
    assert_close(jax_sd[key], torch_sd[key], rtol=1e-5, what=key)


@pytest.mark.parametrize("name", ["synthetic", "narrow-paper"])
def test_flax_running_var_switch_differs_by_exactly_the_bessel_factor(name):
  """`bn_unbiased_running_var=False` is flax.nnx.BatchNorm: PyTorch's update x (n-1)/n."""
  jax_sd, torch_sd, before, sizes = _running_stats_after_one_train_forward(name, unbiased=False)
  momentum = 0.1
  for bn, n in sizes.items():
    key = f"{bn}.running_var"
    old = before[key].astype(np.float64)
    unbiased = (torch_sd[key].astype(np.float64) - (1 - momentum) * old) / momentum
    expected = (1 - momentum) * old + momentum * unbiased * (n - 1) / n
    assert_close(jax_sd[key], expected, what=f"{key} (n={n})")


# -- attention -----------------------------------------------------------------------------
def test_mhsa_matches_torch_multihead_attention():
  """Eqs. 3-5 vs nn.MultiheadAttention given the same packed in_proj / out_proj weights."""
  d, heads = 16, 4
  jattn = model_lib.MultiHeadSelfAttention(d, heads, dtype=jnp.float32, rngs=nnx.Rngs(5))
  randomize(jattn, 5)
  tattn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
  with torch.no_grad():
    tattn.in_proj_weight.copy_(torch.from_numpy(np.asarray(jattn.qkv.kernel[...]).T.copy()))
    tattn.in_proj_bias.copy_(torch.from_numpy(np.array(jattn.qkv.bias[...])))
    tattn.out_proj.weight.copy_(torch.from_numpy(np.asarray(jattn.out.kernel[...]).T.copy()))
    tattn.out_proj.bias.copy_(torch.from_numpy(np.array(jattn.out.bias[...])))
  z = np.random.default_rng(0).standard_normal((3, 10, d)).astype(np.float32)
  zt = torch.from_numpy(z)
  expected = tattn(zt, zt, zt, need_weights=False)[0].detach().numpy()
  assert_close(jattn(jnp.asarray(z)), expected, what="MHSA")
  assert np.abs(expected).max() > 0.1


# -- loss and gradients ----------------------------------------------------------------------
def test_loss_and_logit_gradient_match_reference():
  rng = np.random.default_rng(2)
  logits = (3 * rng.standard_normal((2, 3, 16, 16))).astype(np.float32)
  target = (rng.uniform(size=logits.shape) > 0.6).astype(np.float32)
  (total, parts), grad = jax.value_and_grad(
      lambda l: losses.rst2g_loss(l, jnp.asarray(target)), has_aux=True)(jnp.asarray(logits))
  tl = torch.from_numpy(logits).requires_grad_(True)
  ttotal, tparts = ref.rst2g_loss(tl, torch.from_numpy(target))
  ttotal.backward()
  for k in ("dice", "bce", "boundary"):
    assert_close(parts[k], tparts[k].item(), rtol=1e-5, what=k)
  assert_close(total, ttotal.item(), rtol=1e-5, what="total")
  assert_close(grad, tl.grad.numpy(), rtol=1e-5, what="d loss / d logits")


def _jax_loss_and_grads(jm, x, y):
  graphdef, params, rest = nnx.split(jm, nnx.Param, ...)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return losses.rst2g_loss(model(jnp.asarray(x)), jnp.asarray(y))[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  grad_model = nnx.merge(graphdef, grads, rest)
  return float(loss), convert_torch.nnx_to_torch(grad_model)


@pytest.mark.parametrize("name", ["synthetic", "narrow-paper"])
def test_parameter_gradients_match_reference(name):
  """d loss / d every parameter, training mode (batch statistics), in the PyTorch layout."""
  cfg = CONFIGS[name]()
  jm, tm = make_pair(cfg, seed=4)
  x, y = slabs(cfg, seed=4)
  set_mode(jm, tm, True)
  loss, jgrads = _jax_loss_and_grads(jm, x, y)
  tloss = ref.rst2g_loss(tm(to_torch(x)), torch.from_numpy(y))[0]
  tloss.backward()
  assert_close(loss, tloss.item(), what="loss")
  named = dict(tm.named_parameters())
  assert set(named) <= set(jgrads)
  for key, p in named.items():
    assert_close(jgrads[key], p.grad.numpy(), what=f"grad {key}")


# -- optimizer -------------------------------------------------------------------------------
def test_three_adam_steps_match_torch_adam():
  """ts.make_optimizer (add_decayed_weights + adam) vs torch.optim.Adam(lr, weight_decay).

  Two JAX runs from the same weights and batches as PyTorch:
  - optimizer alone: optax fed PyTorch's gradients. Every parameter within
    1e-7 + 1e-6 |p| of PyTorch's after each step (float32 rounding of one update);
  - whole step: JAX's own gradients. Adam moves a coordinate by ~lr * g / (|g| + eps), which
    turns the ~1e-7 relative gradient differences of `test_parameter_gradients_match_reference`
    into an O(lr) difference where a gradient is itself ~1e-7 of its tensor's scale. So: all but
    0.1 % of all elements within 2e-6 (0.2 % of a step), all within 2 lr per step taken.
  A decoupled (AdamW) decay, a missing bias correction or a wrong lr is off everywhere.
  """
  cfg = synthetic_config()
  train_cfg = nact.get_config().train   # the paper's: constant lr 1e-3, weight decay 1e-4
  assert (train_cfg.schedule, train_cfg.warmup_steps, train_cfg.grad_clip_norm) == ("constant", 0, 0)
  lr = train_cfg.learning_rate
  jm, tm = make_pair(cfg, seed=6)
  set_mode(jm, tm, True)
  tx = ts.make_optimizer(train_cfg)
  graphdef, params, rest = nnx.split(jm, nnx.Param, ...)
  opt_state = tx.init(params)
  alone_params, alone_state = params, tx.init(params)
  topt = torch.optim.Adam(tm.parameters(), lr=lr, weight_decay=train_cfg.weight_decay)

  @jax.jit
  def step(params, rest, opt_state, x, y):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, rest, copy=True)
      loss = losses.rst2g_loss(model(x), y)[0]
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return (*apply(grads, opt_state, params), rest)

  @jax.jit
  def apply(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def torch_grads_as_nnx():
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    sd.update({k: p.grad for k, p in tm.named_parameters()})
    grad_model = convert_torch.torch_to_nnx(sd, nnx.merge(graphdef, params, rest, copy=True))
    return nnx.state(grad_model, nnx.Param)

  start = {k: v.detach().clone() for k, v in tm.named_parameters()}
  for i in range(3):
    x, y = slabs(cfg, seed=10 + i)
    params, opt_state, rest = step(params, rest, opt_state, jnp.asarray(x), jnp.asarray(y))
    topt.zero_grad()
    ref.rst2g_loss(tm(to_torch(x)), torch.from_numpy(y))[0].backward()
    alone_params, alone_state = apply(torch_grads_as_nnx(), alone_state, alone_params)
    topt.step()
    whole = convert_torch.nnx_to_torch(nnx.merge(graphdef, params, rest))
    alone = convert_torch.nnx_to_torch(nnx.merge(graphdef, alone_params, rest))
    moved, off, total = 0.0, 0, 0
    for key, p in tm.named_parameters():
      expected = p.detach().numpy()
      np.testing.assert_allclose(alone[key], expected, rtol=1e-6, atol=1e-7,
                                 err_msg=f"optimizer alone, step {i + 1}: {key}")
      diff = np.abs(whole[key] - expected)
      off, total = off + int(np.sum(diff > 2e-6)), total + diff.size
      assert diff.max() <= 2 * lr * (i + 1), f"whole step {i + 1}: {key}"
      moved = max(moved, float((p.detach() - start[key]).abs().max()))
    assert off <= 1e-3 * total, f"whole step {i + 1}: {off} of {total} elements off by > 2e-6"
    assert moved > 0.5 * lr * (i + 1)   # the parameters really moved by ~lr per step


# -- conversion -------------------------------------------------------------------------------
def test_jax_torch_jax_round_trip_is_exact():
  cfg = narrow_paper_config()
  a = random_model(cfg, 0)
  sd = convert_torch.nnx_to_torch(a)
  b = convert_torch.torch_to_nnx(sd, random_model(cfg, 1))
  sa, sb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
  assert [p for p, _ in sa] == [p for p, _ in sb]
  for (path, va), (_, vb) in zip(sa, sb):
    assert np.array_equal(np.asarray(va[...]), np.asarray(vb[...])), path
  # ... and PyTorch -> JAX -> PyTorch
  tm = ref.build_reference(cfg)
  back = convert_torch.nnx_to_torch(convert_torch.torch_to_nnx(tm.state_dict(), b))
  for key, value in tm.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      assert np.array_equal(back[key], value.numpy()), key


def test_bad_state_dict_lists_every_bad_key():
  cfg = tiny_config.get_config().model
  sd = {k: v.clone() for k, v in ref.build_reference(cfg).state_dict().items()}
  del sd["encoder.stem.first.conv.weight"]
  sd["encoder.extra.weight"] = torch.zeros(3)
  sd["decoder.head.weight"] = torch.zeros(1, 5, 1, 1)
  model = convert_torch.abstract_model(tiny_config.get_config())
  with pytest.raises(convert_torch.ConversionError) as e:
    convert_torch.torch_to_nnx(sd, model)
  msg = str(e.value)
  assert "1 missing: encoder.stem.first.conv.weight" in msg
  assert "1 unknown: encoder.extra.weight" in msg
  assert "1 mis-shaped: decoder.head.weight (1, 5, 1, 1) (expected (1, 4, 1, 1))" in msg
  assert "\n" not in msg


class _Payload:
  """Unpickling this runs `touch <marker>`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_with_payload_is_refused_and_does_not_run(tmp_path):
  marker = tmp_path / "payload_ran"
  path = tmp_path / "evil.pt"
  torch.save({"encoder.stem.first.conv.weight": torch.zeros(1), "x": _Payload(marker)}, path)
  with pytest.raises(convert_torch.ConversionError, match="refused to load"):
    convert_torch.load_torch_state_dict(path)
  assert not marker.exists()
  # The file does carry a working payload: an unsafe load runs it.
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_convert_cli_restore_forward_equals_pytorch(tmp_path):
  """PyTorch weights -> CLI -> FoldCheckpoints (as training and inference restore them)."""
  config = tiny_config.get_config()
  torch.manual_seed(0)
  tm = ref.build_reference(config.model)
  x, _ = slabs(config.model, seed=7)
  tm.train()
  with torch.no_grad():
    tm(to_torch(x))          # non-trivial running statistics
  tm.eval()
  pt = tmp_path / "model.pt"
  torch.save(tm.state_dict(), pt)
  out = tmp_path / "fold_0" / "checkpoints"
  proc = subprocess.run(
      [sys.executable, "-m", "rst2g_jax.convert_torch", "--config=tests/tiny_config.py",
       f"--torch_checkpoint={pt}", f"--output={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]

  model = convert_torch.abstract_model(config)
  graphs, _, _ = ts.split_model(model)
  target, mesh = convert_torch._abstract_state(config, model)  # pylint: disable=protected-access
  ckpt = checkpointing.FoldCheckpoints(out, async_save=False)
  best, meta = ckpt.restore_best(ts.abstract_state(target, mesh))
  last, _ = ckpt.restore_last(ts.abstract_state(target, mesh))
  ckpt.close()
  assert meta["converted_from"] == "model.pt" and int(best.step) == 0
  with torch.no_grad():
    expected = tm(to_torch(x)).numpy()
  for state in (best, last):
    restored = nnx.merge(graphs.eval, state.params, state.model_state)
    assert_close(jax_forward(restored, jnp.asarray(x)), expected, what="restored forward")

  # --to_torch gives back the same tensors.
  back = tmp_path / "back.pt"
  convert_torch.convert(config, str(back), str(out), to_torch=True)
  again = torch.load(back, weights_only=True)
  assert set(again) == set(tm.state_dict())
  for key, value in tm.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      assert torch.equal(again[key], value), key


def test_cli_error_is_one_line(tmp_path):
  bad = tmp_path / "bad.pt"
  bad.write_bytes(b"not a checkpoint")
  proc = subprocess.run(
      [sys.executable, "-m", "rst2g_jax.convert_torch", "--config=tests/tiny_config.py",
       f"--torch_checkpoint={bad}", f"--output={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr


def test_torch_is_not_a_runtime_import():
  code = ("import sys, pkgutil, importlib, rst2g_jax\n"
          "for m in pkgutil.iter_modules(rst2g_jax.__path__):\n"
          "  importlib.import_module('rst2g_jax.' + m.name)\n"
          "assert 'torch' not in sys.modules, 'torch imported'\n"
          "print('ok')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
