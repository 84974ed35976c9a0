"""Three train steps of the tiny model on a fixed global batch; also one process of a
two-process run (test_train.py) when JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID are set: each process then feeds its own rows of the global batch.

`python -m tests.multihost_worker OUT.npz` writes the parameters and the last loss.
"""
import sys

import jax
import numpy as np

from rst2g_jax import train
from rst2g_jax import train_state as ts
from tests import tiny_config

GLOBAL_BATCH = 8


def global_batch():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(GLOBAL_BATCH, 4, 32, 32, 3)).astype(np.float32)
  mask = (rng.random((GLOBAL_BATCH, 4, 32, 32)) > 0.8).astype(np.float32)
  return image, mask


def three_steps(data_devices: int = -1):
  """(state, metrics) after 3 steps on a mesh of `data_devices` (-1: all, all processes).

  The network is the tiny 2D U-Net baseline (BatchNorm, same step, same shardings as
  RST2G): what is tested is the step's sharding and its global-batch BatchNorm, and
  the U-Net compiles ~2.5x faster than RST2G on CPU.
  """
  config = tiny_config.get_config()
  config.model.name = "unet"
  config.mesh.data = data_devices
  mesh = ts.make_mesh(config.mesh)
  programs = train.make_programs(config, mesh)
  state = programs.init(0)
  image, mask = global_batch()
  per = GLOBAL_BATCH // jax.process_count()
  rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
  sharding = ts.batch_sharding(mesh)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      with jax.transfer_guard_host_to_device("allow"):  # as train.py: the explicit upload
        x = jax.make_array_from_process_local_data(sharding, image[rows])
        y = jax.make_array_from_process_local_data(sharding, mask[rows])
      state, metrics = programs.step(state, x, y)
  return state, metrics


def flat_params(state) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
          for k, v in jax.tree_util.tree_leaves_with_path(state.params)}


def main(out_path):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  ts.maybe_initialize_distributed(tiny_config.get_config().mesh)
  state, metrics = three_steps()
  params = flat_params(state)
  if jax.process_index() == 0:
    np.savez(out_path, loss=np.asarray(jax.device_get(metrics["loss"])),
             devices=jax.device_count(), processes=jax.process_count(), **params)


if __name__ == "__main__":
  main(sys.argv[1])
