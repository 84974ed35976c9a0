"""Time one training step of the configured model (forward, backward, Adam update) on random data.

  python benchmarks/model_step.py --config=configs/synthetic.py --batch=2 --steps=20

Prints the compile time, the median and best wall time per step over `--steps` steps, and the
process CPU time per step (a figure other load on the machine disturbs less). The loss is a
plain BCE so the figure measures the network, not the loss or the input pipeline.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rst2g_jax import model as model_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 2, "Slabs per step.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after the compile step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def make_train_step(graphdef, tx):
  """A jitted step on (params, rest, opt_state, x, y), the split/merge form."""

  @jax.jit
  def step(params, rest, opt_state, x, y):
    def loss_fn(params, rest):
      model = nnx.merge(graphdef, params, rest, copy=True)
      loss = optax.sigmoid_binary_cross_entropy(model(x), y).mean()
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  return step


def main(argv):
  del argv
  config = _CONFIG.value
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  model = model_lib.build_model(config.model, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(optax.add_decayed_weights(config.train.weight_decay),
                   optax.adam(config.train.learning_rate))
  opt_state = tx.init(params)
  h, w = model_lib.image_size(config.model)
  shape = (_BATCH.value, config.data.slab, h, w)
  x = jax.random.normal(jax.random.key(0), shape + (3,))
  y = (jax.random.uniform(jax.random.key(1), shape) > 0.8).astype(jnp.float32)
  step = make_train_step(graphdef, tx)

  start = time.perf_counter()
  params, rest, opt_state, loss = jax.block_until_ready(step(params, rest, opt_state, x, y))
  compile_s = time.perf_counter() - start
  times, cpu_times = [], []
  for _ in range(_STEPS.value):
    start, cpu_start = time.perf_counter(), time.process_time()
    params, rest, opt_state, loss = jax.block_until_ready(step(params, rest, opt_state, x, y))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  print(f"backend {jax.default_backend()}  input {shape + (3,)}  dtype {_DTYPE.value}")
  print(f"compile+first step {compile_s:.1f} s; step median {np.median(times) * 1e3:.1f} ms, "
        f"best {np.min(times) * 1e3:.1f} ms over {len(times)} steps; loss {float(loss):.4f}")
  print(f"process CPU time per step: median {np.median(cpu_times) * 1e3:.1f} ms "
        f"(all threads; wall time is lower when XLA's threads run in parallel)")


if __name__ == "__main__":
  app.run(main)
