"""Optimizer, device mesh, shardings and the jitted train step.

The model is split once into a static graph and pure array state
(`nnx.split`); the step is a `jax.jit` over that state with `NamedSharding`
in/out shardings and donated buffers, and `nnx.merge` rebuilds the module
inside the trace. This keeps the Python work per step to one jitted call
(Flax NNX performance guide) and makes the state an ordinary pytree that Orbax
saves and restores as is.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


# -- devices ----------------------------------------------------------------------
def maybe_initialize_distributed(mesh_cfg: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run when the config or the usual environment asks for it.

  `jax.distributed.initialize()` reads the coordinator from the cluster environment
  (SLURM, TPU pods, ...) or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; it must run before anything touches the devices.
  """
  from_env = "JAX_COORDINATOR_ADDRESS" in os.environ
  if not (mesh_cfg.get("distributed", False) or from_env):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if from_env:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A 1-D mesh with a "data" axis; `mesh.data = -1` takes every device.

  Auto axis types: convolutions under the pinned JAX's default Explicit axes
  would need output shardings everywhere (DESIGN.md §5 note).
  """
  devices = list(jax.devices() if devices is None else devices)
  size = int(mesh_cfg.data)
  size = len(devices) if size == -1 else size
  if size < 1 or size > len(devices) or len(devices) % size:
    raise ValueError(f"mesh.data={mesh_cfg.data} does not fit {len(devices)} device(s); "
                     "expected -1 or a divisor of the device count")
  return jax.make_mesh((size,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:size])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", everything else whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# -- optimizer --------------------------------------------------------------------
def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  lr, warmup = float(train_cfg.learning_rate), int(train_cfg.warmup_steps)
  if train_cfg.schedule == "constant":
    if warmup <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup > 0 else lr, lr, warmup, max(int(train_cfg.num_steps), warmup + 1))
  raise ValueError(f"train.schedule={train_cfg.schedule!r}; expected 'constant' or 'cosine'")


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The paper's torch `Adam(lr, weight_decay)`: L2 added to the gradient before Adam.

  Coupled weight decay, not AdamW. Clipping (by global norm) sits first so that it
  sees the raw gradient, as `clip_grad_norm_` before `optimizer.step()` would.
  """
  parts = []
  if float(train_cfg.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)))
  if float(train_cfg.weight_decay) > 0:
    parts.append(optax.add_decayed_weights(float(train_cfg.weight_decay)))
  parts.append(optax.adam(learning_rate_schedule(train_cfg)))
  return optax.chain(*parts)


# -- state ------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a plain pytree (saved by Orbax as is)."""
  step: jax.Array
  params: nnx.State
  model_state: nnx.State     # BatchNorm statistics and any other non-parameter variables
  opt_state: Any
  rng: jax.Array             # raw uint32 key data, advanced once per step


@dataclasses.dataclass(frozen=True)
class Graphs:
  """The module's static structure in training and in inference mode."""
  train: nnx.GraphDef
  eval: nnx.GraphDef


def split_model(model: nnx.Module) -> tuple[Graphs, nnx.State, nnx.State]:
  """(graphs, params, other variables); train/eval differ only in static flags."""
  model.eval()
  eval_graph, _, _ = nnx.split(model, nnx.Param, ...)
  model.train()
  train_graph, params, rest = nnx.split(model, nnx.Param, ...)
  return Graphs(train=train_graph, eval=eval_graph), params, rest


def init_train_state(params, model_state, tx: optax.GradientTransformation, seed: int,
                     mesh: Mesh) -> TrainState:
  """The initial state from existing arrays, placed replicated on the mesh."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(seed)))
  return jax.device_put(state, replicated(mesh))


def make_init(build_fn: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
              mesh: Mesh) -> tuple[Graphs, Callable[[int], TrainState]]:
  """(graphs, init) where `init(seed)` makes a fresh TrainState on the mesh.

  The structure comes from `nnx.eval_shape` (no arrays made); `init` is one
  compiled function (big_vision's pattern) that creates the arrays directly with
  their replicated sharding, instead of hundreds of small eager ops, and is
  compiled once for all folds (the seed is an argument). Keys are "rbg": XLA
  compiles their init in seconds where threefry takes tens of seconds on CPU.
  """
  graphs, _, _ = split_model(nnx.eval_shape(lambda: build_fn(nnx.Rngs(0))))

  def init(seed):
    model = build_fn(nnx.Rngs(jax.random.key(seed, impl="rbg")))
    model.train()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=rest,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  abstract = jax.eval_shape(init, 0)
  jitted = jax.jit(init, out_shardings=state_shardings(abstract, mesh))
  return graphs, lambda seed: jitted(jnp.asarray(seed, jnp.int32))


def state_shardings(state: TrainState, mesh: Mesh):
  """Parameters and optimizer state are replicated over "data"."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def abstract_state(state: TrainState, mesh: Mesh):
  """ShapeDtypeStructs with shardings: the restore target for Orbax."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)


def _select_tree(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    mesh: Mesh, state: TrainState):
  """The jitted step `(state, image, mask) -> (state, metrics)`.

  `image` [B, S, H, W, 3] and `mask` [B, S, H, W] are global arrays sharded over
  "data"; BatchNorm therefore normalises with global-batch statistics (XLA
  inserts the cross-device reductions). A non-finite loss leaves the state
  unchanged (the update is discarded in the step) and reports `finite=0`, so the
  host can stop with the last good state intact.
  """
  def step(state: TrainState, image: jax.Array, mask: jax.Array):
    def compute_loss(params, model_state):
      model = nnx.merge(graphdef, params, model_state, copy=True)
      logits = model(image)
      loss, parts = loss_fn(logits, mask)
      return loss, (parts, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (parts, model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state.params, state.model_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    new = TrainState(step=state.step + 1, params=params, model_state=model_state,
                     opt_state=opt_state, rng=rng)
    new = _select_tree(finite, new, state)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "finite": finite.astype(jnp.int32), **parts}
    return new, metrics

  shard_state = state_shardings(state, mesh)
  data = batch_sharding(mesh)
  return jax.jit(step, in_shardings=(shard_state, data, data),
                 out_shardings=(shard_state, replicated(mesh)), donate_argnums=(0,))


def make_predict_fn(graphdef: nnx.GraphDef, mesh: Mesh, *, mirror_tta: bool = False):
  """Jitted `(params, model_state, slabs [N,S,H,W,3]) -> logits [N,S,H,W]` f32.

  With `mirror_tta`, logits are averaged over the four in-plane flips (y, x, both);
  that costs four forward passes.
  """
  def predict(params, model_state, slabs):
    model = nnx.merge(graphdef, params, model_state)
    if not mirror_tta:
      return model(slabs).astype(jnp.float32)
    total = jnp.zeros(slabs.shape[:4], jnp.float32)
    for axes in ((), (2,), (3,), (2, 3)):  # fixed set of views, not a loop over data
      view = jnp.flip(slabs, axes) if axes else slabs
      out = model(view).astype(jnp.float32)
      total = total + (jnp.flip(out, axes) if axes else out)
    return total / 4.0

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(predict, in_shardings=(rep, rep, data), out_shardings=data)
