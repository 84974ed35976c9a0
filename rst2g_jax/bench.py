"""JAX against the PyTorch reference on this machine: train step, whole-volume inference, memory.

  python -m rst2g_jax.bench --config=configs/synthetic.py [--batch=2] [--steps=10]

One run, same batch and weights on both sides (converted with `convert_torch`), the paper's
loss and optimizer (Adam, coupled L2) on both. Times are medians over `--steps` after warm-up
(JAX: after compilation), taken round-robin (one JAX step, one PyTorch step, ...) so that other
load on the machine affects both sides alike. Prints every time and the ratios; the LAST line is
`jax_vs_torch_eager_train_speedup: <torch eager step time / JAX step time>`.
PyTorch is a test/benchmark dependency (requirements-test.txt), imported only here.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags



def _define_flags():
  """Defined when run as a program only, so that importing this module defines no flags."""
  global _CONFIG, _BATCH, _STEPS, _VOLUME, _COMPILE  # pylint: disable=global-statement
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.")
  _BATCH = flags.DEFINE_integer("batch", 0, "Slabs per train step (0: config.train.batch_size).")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.")
  _VOLUME = flags.DEFINE_integer("volume_slices", 32, "Slices of the whole volume to infer.")
  _COMPILE = flags.DEFINE_bool("torch_compile", True, "Also time torch.compile'd PyTorch.")


def _median_times(fns: dict, steps: int) -> dict[str, float]:
  """Median wall time of each function, timed round-robin so that all see the same load.

  Also the median process CPU time (all threads) as `<name>_cpu`: oversubscribed cores
  (other load) inflate PyTorch's wall time far more than its CPU time.
  """
  times = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      start, cpu_start = time.perf_counter(), time.process_time()
      fn()
      times[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - cpu_start)
  out = {name: float(np.median(t)) for name, t in times.items()}
  out.update({f"{name}_cpu": float(np.median(t)) for name, t in cpu.items()})
  return out


def _mb(n: float) -> str:
  return f"{n / 2**20:.1f} MiB"


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("error: rst2g_jax.bench needs PyTorch: pip install -r requirements-test.txt",
          file=sys.stderr)
    sys.exit(1)
  try:
    from reference import torch_rst2g as ref  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("error: run rst2g_jax.bench from the repository root (reference/ not importable)",
          file=sys.stderr)
    sys.exit(1)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rst2g_jax import convert_torch, inference, scaling  # pylint: disable=g-import-not-at-top
  from rst2g_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  mcfg, tcfg = config.model, config.train
  batch = _BATCH.value or int(tcfg.batch_size)
  slab = int(config.data.slab)
  h, w = model_lib.image_size(mcfg)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, slab, h, w, 3)).astype(np.float32)
  y = (rng.uniform(size=(batch, slab, h, w)) > 0.8).astype(np.float32)
  loss_kwargs = _loss_kwargs(config)
  print(f"config {mcfg.name} image {h}x{w}, batch {batch} slabs x {slab} slices; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)

  # -- JAX: the training program of train.py, on one device --------------------------------
  train = build_jax_train(config, x, y)
  graphs, compiled, compile_s = train.graphs, train.compiled, train.compile_s
  # The PyTorch copy is taken now: the jitted step donates (deletes) these buffers.
  torch_weights = convert_torch.nnx_to_torch(
      nnx.merge(graphs.train, train.state.params, train.state.model_state))
  mem = scaling.memory_analysis(compiled)   # bytes; the same figures as the scaling study
  jax_step = train.step
  jax_step()

  # -- PyTorch reference, same weights -------------------------------------------------------
  tmodel = ref.build_reference(mcfg)
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in torch_weights.items()})
  tmodel.train()
  xt, yt = torch.from_numpy(x).permute(0, 1, 4, 2, 3).contiguous(), torch.from_numpy(y)
  topt = torch.optim.Adam(tmodel.parameters(), lr=float(tcfg.learning_rate),
                          weight_decay=float(tcfg.weight_decay))

  def torch_step(net):
    topt.zero_grad(set_to_none=True)
    loss = ref.rst2g_loss(net(xt), yt, **loss_kwargs)[0]
    loss.backward()
    topt.step()

  torch_step(tmodel)
  train_fns = {"jax": jax_step, "eager": lambda: torch_step(tmodel)}
  torch_compiled = None
  if _COMPILE.value:
    try:
      compiled_net = torch.compile(tmodel)
      start = time.perf_counter()
      for _ in range(4):   # compilation, then a few slower steps before the time settles
        torch_step(compiled_net)
      torch_compile_s = time.perf_counter() - start
      train_fns["compiled"] = lambda: torch_step(compiled_net)
    except Exception as e:  # pylint: disable=broad-except
      print(f"torch.compile skipped: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
  train_times = _median_times(train_fns, _STEPS.value)
  jax_train, torch_eager = train_times["jax"], train_times["eager"]
  torch_compiled = train_times.get("compiled")

  # -- whole-volume inference (sliding slabs, inference.py), eval mode --------------------
  volume = rng.standard_normal((_VOLUME.value, h, w, 3)).astype(np.float32)
  step_slices = int(config.eval.slab_step)
  predict = ts.make_predict_fn(graphs.eval, train.mesh)
  final = train.state

  def jax_predict(slabs):
    return np.asarray(predict(final.params, final.model_state, jnp.asarray(slabs)))

  def jax_volume():
    return inference.sliding_slab_logits(volume, jax_predict, slab=slab, step=step_slices,
                                         batch_size=batch)

  jax_volume()
  tmodel.eval()

  def torch_predict(slabs):
    with torch.no_grad():
      return tmodel(torch.from_numpy(slabs).permute(0, 1, 4, 2, 3).contiguous()).numpy()

  def torch_volume():
    return inference.sliding_slab_logits(volume, torch_predict, slab=slab, step=step_slices,
                                         batch_size=batch)

  torch_volume()
  infer_times = _median_times({"jax": jax_volume, "torch": torch_volume}, max(3, _STEPS.value // 3))
  jax_infer, torch_infer = infer_times["jax"], infer_times["torch"]

  # -- report ------------------------------------------------------------------------------
  cpu = {k: train_times[f"{k}_cpu"] * 1e3 for k in train_fns}
  print(f"jax train step:            {jax_train * 1e3:9.1f} ms  (CPU {cpu['jax']:.1f} ms; "
        f"compile {compile_s:.1f} s)")
  print(f"torch eager train step:    {torch_eager * 1e3:9.1f} ms  (CPU {cpu['eager']:.1f} ms)")
  if torch_compiled is not None:
    print(f"torch.compile train step:  {torch_compiled * 1e3:9.1f} ms  (CPU {cpu['compiled']:.1f} "
          f"ms; compile + 4 warm-up steps {torch_compile_s:.1f} s)")
  print(f"jax whole volume ({_VOLUME.value} slices):  {jax_infer * 1e3:9.1f} ms")
  print(f"torch whole volume ({_VOLUME.value} slices): {torch_infer * 1e3:9.1f} ms")
  print(f"jax compiled train step memory: peak ~{_mb(mem['peak_bytes_estimate'])} (arguments "
        f"{_mb(mem['argument_bytes'])}, outputs {_mb(mem['output_bytes'])}, "
        f"temporaries {_mb(mem['temp_bytes'])}, aliased {_mb(mem['alias_bytes'])})")
  if torch_compiled is not None:
    print(f"jax_vs_torch_compile_train_speedup: {torch_compiled / jax_train:.2f}")
  print(f"jax_vs_torch_eager_inference_speedup: {torch_infer / jax_infer:.2f}")
  print(f"jax_vs_torch_eager_train_speedup: {torch_eager / jax_train:.2f}")


def _loss_kwargs(config) -> dict:
  lcfg = config.loss
  return dict(bce_weight=float(lcfg.bce_weight), boundary_weight=float(lcfg.boundary_weight),
              dice_eps=float(lcfg.dice_eps))


class JaxTrain:
  """The compiled train step of train.py on one device, on a fixed batch; `step()` runs one."""

  def __init__(self, mesh, graphs, compiled, state, x, y, compile_s: float):
    self.mesh, self.graphs, self.compiled, self.state = mesh, graphs, compiled, state
    self.x, self.y, self.compile_s = x, y, compile_s

  def step(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.state, metrics = self.compiled(self.state, self.x, self.y)
    jax.block_until_ready(metrics)
    return metrics


def build_jax_train(config, x: np.ndarray, y: np.ndarray) -> JaxTrain:
  """Initialises the model and compiles train.py's step (paper loss, Adam) for batch (x, y)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rst2g_jax import losses  # pylint: disable=g-import-not-at-top
  from rst2g_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top

  loss_kwargs = _loss_kwargs(config)
  mesh = ts.make_mesh(ml_mesh(config), devices=jax.devices()[:1])
  tx = ts.make_optimizer(config.train)
  graphs, init = ts.make_init(lambda rngs: model_lib.build_model(config.model, rngs=rngs), tx,
                              mesh)
  state = init(0)
  loss_fn = lambda logits, mask: losses.rst2g_loss(logits, mask, **loss_kwargs)  # noqa: E731
  step = ts.make_train_step(graphs.train, loss_fn, tx, mesh, state)
  xj = jax.device_put(jnp.asarray(x), ts.batch_sharding(mesh))
  yj = jax.device_put(jnp.asarray(y), ts.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = step.lower(state, xj, yj).compile()
  return JaxTrain(mesh, graphs, compiled, state, xj, yj, time.perf_counter() - start)


def ml_mesh(config):
  """The config's mesh section restricted to one device (both sides run on one device)."""
  mesh_cfg = config.mesh.copy_and_resolve_references()
  mesh_cfg.data = 1
  return mesh_cfg


if __name__ == "__main__":
  _define_flags()
  app.run(main)
