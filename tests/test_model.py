"""RST2G and U-Net: shapes of every part, parameter counts, the GAT against eqs. 11-12, one step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import nact, synthetic
from rst2g_jax import layers, model as model_lib, summary


def tiny_config(**overrides):
  """The synthetic model shrunk for fast compiles: 32x32 slices, widths (4, 8, 16), 1 ViT block."""
  cfg = synthetic.get_config().model
  cfg.update(dict(image_size=(32, 32), stem_features=4, features=(8, 16), vit_depth=1,
                  vit_heads=2))
  cfg.update(overrides)
  return cfg


def narrow_paper_config():
  """The paper's structure (4 DownBlocks, ViT depth 6, 4 heads), narrow, on 32x32 slices."""
  cfg = nact.get_config().model
  cfg.update(dict(image_size=(32, 32), stem_features=4, features=(8, 8, 16, 16)))
  return cfg


def random_slabs(b, s, h, w, seed=0):
  x = jax.random.normal(jax.random.key(seed), (b, s, h, w, 3))
  y = (jax.random.uniform(jax.random.key(seed + 1), (b, s, h, w)) > 0.7).astype(jnp.float32)
  return x, y


def part_outputs(model, x):
  """Runs RST2G part by part the way RST2G.__call__ chains them; every part's output by name."""
  b, s, h, w, _ = x.shape
  out = {}
  f = model.encoder.stem(model_lib.stack_modalities(x))
  out["encoder/stem"] = f
  for i, down in enumerate(model.encoder.downs):
    f = out[f"encoder/downs/{i}"] = down(f)
  out["encoder/vit"] = model.encoder.vit(f)
  encoder_maps = [out["encoder/stem"]] + [out[f"encoder/downs/{i}"]
                                          for i in range(len(model.encoder.downs) - 1)]

  def split(f):
    return model_lib.split_modalities(f, batch=b, slab=s)

  for i, (msr, f) in enumerate(zip(model.msr, encoder_maps)):
    out[f"msr/{i}"] = msr(*split(f))
  pre, post, res = split(out["encoder/vit"])
  stge = model.stge
  for name, isa, f in (("pre", stge.isa_pre, pre), ("post", stge.isa_post, post),
                       ("res", stge.isa_res, res)):
    out[f"stge/isa_{name}"] = isa(f, slab=s)
  out["stge/gat"] = stge.isa_post.gat(post.reshape(b * s, -1, post.shape[-1]))
  out["stge"] = stge(pre, post, res, slab=s)
  out["decoder"] = model.decoder(out["stge"], [out[f"msr/{i}"] for i in range(len(model.msr))])
  out["model"] = model(x)
  return out


def expected_part_shapes(cfg, b, s):
  h, w = model_lib.image_size(cfg)
  widths = model_lib.encoder_widths(cfg)
  n = b * s

  def at(level, batch):
    return (batch, h // 2**level, w // 2**level, widths[level])

  deepest = len(widths) - 1
  shapes = {"encoder/stem": at(0, 3 * n), "encoder/vit": at(deepest, 3 * n)}
  for i in range(deepest):
    shapes[f"encoder/downs/{i}"] = at(i + 1, 3 * n)
    shapes[f"msr/{i}"] = at(i, n)
  for name in ("pre", "post", "res"):
    shapes[f"stge/isa_{name}"] = at(deepest, n)
  shapes["stge/gat"] = (n, (h // 2**deepest) * (w // 2**deepest), widths[-1])
  shapes["stge"] = at(deepest, n)
  shapes["decoder"] = (n, h, w)
  shapes["model"] = (b, s, h, w)
  return shapes


def abstract_eval(model, fn, *args):
  """fn(model, *args) on shapes only: nothing allocated, nothing compiled."""
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda state, *args: fn(nnx.merge(graphdef, state), *args), state, *args)


def shapes_of(tree):
  return {k: tuple(v.shape) for k, v in tree.items()}


@pytest.mark.parametrize("get_config", [nact.get_config, synthetic.get_config],
                         ids=["paper", "synthetic"])
def test_part_shapes_full_configs(get_config):
  config = get_config()
  cfg, b, s = config.model, 2, config.data.slab
  h, w = model_lib.image_size(cfg)
  model = summary.abstract_model(cfg)
  x = jax.ShapeDtypeStruct((b, s, h, w, 3), jnp.float32)
  out = abstract_eval(model, part_outputs, x)
  assert shapes_of(out) == expected_part_shapes(cfg, b, s)
  assert out["model"].dtype == jnp.float32


def test_part_shapes_and_values_jitted():
  """The synthetic model, shrunk, run for real: every part's shape, and the chain == model."""
  cfg = tiny_config()
  b, s = 2, 2
  model = model_lib.build_model(cfg, rngs=nnx.Rngs(0))
  model.eval()
  x, _ = random_slabs(b, s, 32, 32)
  out = nnx.jit(part_outputs)(model, x)
  assert shapes_of(out) == expected_part_shapes(cfg, b, s)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
  np.testing.assert_allclose(out["model"], out["decoder"].reshape(b, s, 32, 32), rtol=1e-5)


def test_narrow_paper_structure_runs_jitted():
  cfg = narrow_paper_config()
  model = model_lib.build_model(cfg, rngs=nnx.Rngs(0))
  x, _ = random_slabs(1, 4, 32, 32)
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  assert logits.shape == (1, 4, 32, 32) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def count(module):
  return summary.count_params(module)


def test_paper_parameter_count_within_one_percent():
  total = count(summary.abstract_model(nact.get_config().model))
  assert abs(total - 85_240_000) <= 0.01 * 85_240_000, total


def test_ablation_switches_remove_exactly_their_part():
  cfg = nact.get_config().model
  full = summary.abstract_model(cfg)
  total = count(full)

  def ablated(**switch):
    variant = nact.get_config().model
    variant.update(switch)
    return count(summary.abstract_model(variant))

  encoder_3x3 = [leaf.size for path, leaf in nnx.to_flat_state(nnx.state(full.encoder, nnx.Param))
                 if path[-1] == "kernel" and leaf.shape[:2] == (3, 3)]
  assert len(encoder_3x3) == 2 * (1 + len(cfg.features))   # two per stem/DownBlock
  # 1x1 instead of 3x3: each kernel keeps 1 of its 9 taps.
  assert ablated(use_local=False) == total - sum(n - n // 9 for n in encoder_3x3)
  assert ablated(use_global=False) == total - count(full.encoder.vit)
  assert ablated(use_msr=False) == total - sum(count(m) for m in full.msr)
  assert ablated(use_stge=False) == total - count(full.stge)


@pytest.mark.parametrize("switch", ["use_local", "use_global", "use_msr", "use_stge"])
def test_ablated_model_runs(switch):
  cfg = tiny_config(**{switch: False})
  model = model_lib.build_model(cfg, rngs=nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.float32)
  assert abstract_eval(model, lambda m, x: m(x), x).shape == (1, 2, 32, 32)


def leaky_relu(v, slope=0.2):
  return v if v > 0 else slope * v


def gat_numpy(h, w, a):
  """Eqs. 11-12 literally: a double loop over node pairs i, j with the concatenation."""
  graphs, nodes, _ = h.shape
  out = np.zeros((graphs, nodes, w.shape[1]))
  for g in range(graphs):
    wh = h[g] @ w
    for i in range(nodes):
      e = np.array([leaky_relu(a @ np.concatenate([wh[i], wh[j]])) for j in range(nodes)])
      alpha = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
      z = sum(alpha[j] * wh[j] for j in range(nodes))
      out[g, i] = np.where(z > 0, z, np.expm1(z))   # ELU
  return out


def test_graph_attention_matches_numpy_double_loop():
  gat = model_lib.GraphAttention(5, rngs=nnx.Rngs(3))
  h = np.asarray(jax.random.normal(jax.random.key(4), (3, 7, 5)))
  expected = gat_numpy(h.astype(np.float64), np.asarray(gat.linear.kernel[...], np.float64),
                       np.asarray(gat.attention[...], np.float64)[:, 0])
  np.testing.assert_allclose(np.asarray(gat(jnp.asarray(h))), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["paper", "slab"])
def test_inter_slice_attention_graphs_match_numpy(mode):
  """paper: one graph per slice (N = h*w); slab: one graph over the slab's S slices."""
  b, s, h, w, c = 2, 3, 2, 3, 4
  opts = layers.LayerOptions()
  isa = model_lib.InterSliceAttention(c, mode, opts=opts, rngs=nnx.Rngs(5))
  isa.eval()
  f = jax.random.normal(jax.random.key(6), (b * s, h, w, c))
  conv_out = np.asarray(isa.conv(f), np.float64)
  nodes = conv_out.reshape((b * s, h * w, c) if mode == "paper" else (b, s * h * w, c))
  graph = gat_numpy(nodes, np.asarray(isa.gat.linear.kernel[...], np.float64),
                    np.asarray(isa.gat.attention[...], np.float64)[:, 0]).reshape(b * s, h, w, c)
  gate_logits = graph @ np.asarray(isa.gate.kernel[...])[0, 0] + np.asarray(isa.gate.bias[...])
  expected = graph / (1 + np.exp(-gate_logits))
  np.testing.assert_allclose(np.asarray(isa(f, slab=s)), expected, atol=1e-5)


def make_step():
  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, logits, grads

  return step


def flat(state):
  return {"/".join(map(str, path)): np.asarray(leaf[...], np.float32)
          for path, leaf in nnx.to_flat_state(state)}


@pytest.mark.parametrize("name,dtype,isa_mode,remat", [
    ("rst2g", jnp.float32, "paper", False), ("rst2g", jnp.bfloat16, "slab", True),
    ("unet", jnp.float32, "paper", False)])
def test_one_optimizer_step(name, dtype, isa_mode, remat):
  cfg = tiny_config(name=name, isa={"mode": isa_mode})
  model = model_lib.build_model(cfg, dtype=dtype, remat=remat, rngs=nnx.Rngs(0))
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params_before = flat(nnx.state(model, nnx.Param))
  stats_before = flat(nnx.state(model, nnx.BatchStat))
  x, y = random_slabs(2, 2, 32, 32)

  loss, logits, grads = make_step()(model, optimizer, x, y)

  assert np.isfinite(float(loss))
  assert logits.shape == (2, 2, 32, 32) and logits.dtype == jnp.float32
  grads = flat(grads)
  assert grads.keys() == params_before.keys()
  bad = [k for k, g in grads.items() if not (np.all(np.isfinite(g)) and np.any(g != 0))]
  assert not bad, f"zero or non-finite gradients: {bad}"
  params_after = flat(nnx.state(model, nnx.Param))
  assert all(params_after[k].dtype == np.float32 for k in params_after)
  unchanged = [k for k in params_before if np.array_equal(params_before[k], params_after[k])]
  assert not unchanged, f"parameters the step did not move: {unchanged}"
  stats_after = flat(nnx.state(model, nnx.BatchStat))
  assert any(not np.array_equal(stats_before[k], stats_after[k]) for k in stats_before)

  if name == "rst2g" and dtype == jnp.float32:
    # Eval mode uses running statistics: a slab's logits do not depend on the other slab.
    model.eval()
    forward = nnx.jit(lambda m, x: m(x))
    logits, other = forward(model, x), forward(model, x.at[1].set(-x[1]))
    np.testing.assert_array_equal(logits[0], other[0])
    assert not np.allclose(logits[1], other[1])


def test_remat_gives_the_same_gradients():
  """U-Net and RST2G share the remat wrapper (layers.apply_stage); RST2G's runs above."""
  cfg = tiny_config(name="unet")
  x, y = random_slabs(1, 2, 32, 32)

  def grads(remat):
    model = model_lib.build_model(cfg, remat=remat, rngs=nnx.Rngs(0))
    loss_fn = lambda m: optax.sigmoid_binary_cross_entropy(m(x), y).mean()  # noqa: E731
    return flat(nnx.jit(nnx.grad(loss_fn))(model))

  plain, remat = grads(False), grads(True)
  for k in plain:
    np.testing.assert_allclose(remat[k], plain[k], rtol=1e-4, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("name,shape,expected", [
    ("rst2g", (2, 32, 32, 3), "RST2G expects [B, S, 32, 32, 3]"),
    ("rst2g", (1, 2, 32, 32, 1), "RST2G expects [B, S, 32, 32, 3]"),
    ("rst2g", (1, 2, 64, 64, 3), "RST2G expects [B, S, 32, 32, 3]"),
    ("unet", (1, 2, 30, 32, 3), "UNet2D expects [B, S, H, W, 3] with H, W divisible by 4"),
    ("unet", (1, 2, 32, 32), "UNet2D expects [B, S, H, W, 3] with H, W divisible by 4"),
])
def test_bad_input_shape_names_the_expected_shape(name, shape, expected):
  model = model_lib.build_model(tiny_config(name=name), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError) as error:
    model(jnp.zeros(shape))
  assert expected in str(error.value) and str(shape) in str(error.value)


def test_without_vit_any_divisible_size_runs_and_others_raise():
  model = model_lib.build_model(tiny_config(use_global=False), rngs=nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((1, 2, 48, 16, 3), jnp.float32)
  assert abstract_eval(model, lambda m, x: m(x), x).shape == (1, 2, 48, 16)
  with pytest.raises(ValueError, match=r"divisible by 4; got \(1, 2, 46, 16, 3\)"):
    model(jnp.zeros((1, 2, 46, 16, 3)))


def test_bad_config_values_raise():
  with pytest.raises(ValueError, match="isa.mode"):
    summary.abstract_model(tiny_config(isa={"mode": "graph"}))
  with pytest.raises(ValueError, match="model.name"):
    summary.abstract_model(tiny_config(name="vnet"))
  with pytest.raises(ValueError, match="not divisible by 2 heads"):
    summary.abstract_model(tiny_config(features=(8, 15)))
  with pytest.raises(ValueError, match="image_size"):
    summary.abstract_model(tiny_config(image_size=(34, 34)))
