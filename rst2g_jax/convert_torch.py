"""PyTorch state_dict <-> NNX model weights, and a CLI that writes/reads fold checkpoints.

  python -m rst2g_jax.convert_torch --config=configs/nact.py --torch_checkpoint=model.pt \
      --output=WORKDIR/fold_0/checkpoints              # PyTorch -> Orbax
  python -m rst2g_jax.convert_torch --config=configs/nact.py --torch_checkpoint=model.pt \
      --output=WORKDIR/fold_0/checkpoints --to_torch   # Orbax -> PyTorch

The PyTorch layout is `reference/torch_rst2g.py`'s: a key is the NNX path joined by "." with
PyTorch's leaf names. Every layout change is one row of `_RULES`. PyTorch files are read with
`torch.load(weights_only=True)`, which refuses pickles that would run code; torch is imported
lazily here and nowhere else in `rst2g_jax`.

The Orbax side is `checkpointing.FoldCheckpoints`' layout: `DIR/last/0/{state,meta}` and
`DIR/best/0/{state,meta}`, a step-0 `train_state.TrainState` (converted parameters and
BatchNorm statistics, a fresh optimizer state for `config.train`). Pointed at
`<workdir>/fold_<k>/checkpoints`, training resumes from it and inference restores `best`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import pickle
import sys
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rst2g_jax import model as model_lib


class ConversionError(ValueError):
  """A checkpoint that does not fit the configured model; the message lists every bad key."""


@dataclasses.dataclass(frozen=True)
class _Rule:
  torch_name: str                                   # key suffix on the PyTorch side
  to_torch: Callable[[np.ndarray], np.ndarray]
  to_nnx: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _t(x):
  return np.swapaxes(x, -1, -2)


# Flax ConvTranspose (transpose_kernel=False, VALID) applies the kernel unflipped to the dilated
# input; torch ConvTranspose2d is the gradient of a convolution, i.e. the spatially flipped one.
_RULES: dict[tuple[type, tuple[str, ...]], _Rule] = {
    (nnx.Conv, ("kernel",)): _Rule("weight", lambda k: k.transpose(3, 2, 0, 1),   # HWIO -> OIHW
                                   lambda w: w.transpose(2, 3, 1, 0)),
    (nnx.Conv, ("bias",)): _Rule("bias", _same, _same),
    (nnx.ConvTranspose, ("kernel",)): _Rule(
        "weight", lambda k: k[::-1, ::-1].transpose(2, 3, 0, 1),                   # HWIO -> IOHW
        lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1]),
    (nnx.ConvTranspose, ("bias",)): _Rule("bias", _same, _same),
    (nnx.Linear, ("kernel",)): _Rule("weight", _t, _t),                            # [in,out]->[out,in]
    (nnx.Linear, ("bias",)): _Rule("bias", _same, _same),
    (nnx.LayerNorm, ("scale",)): _Rule("weight", _same, _same),
    (nnx.LayerNorm, ("bias",)): _Rule("bias", _same, _same),
    (nnx.BatchNorm, ("scale",)): _Rule("weight", _same, _same),
    (nnx.BatchNorm, ("bias",)): _Rule("bias", _same, _same),
    (nnx.BatchNorm, ("mean",)): _Rule("running_mean", _same, _same),
    (nnx.BatchNorm, ("var",)): _Rule("running_var", _same, _same),
    # nn.MultiheadAttention packs q, k, v (each head-major) in one in_proj, as the NNX qkv does.
    (model_lib.MultiHeadSelfAttention, ("qkv", "kernel")): _Rule("in_proj_weight", _t, _t),
    (model_lib.MultiHeadSelfAttention, ("qkv", "bias")): _Rule("in_proj_bias", _same, _same),
    (model_lib.MultiHeadSelfAttention, ("out", "kernel")): _Rule("out_proj.weight", _t, _t),
    (model_lib.MultiHeadSelfAttention, ("out", "bias")): _Rule("out_proj.bias", _same, _same),
    (model_lib.ViT, ("pos_embed",)): _Rule("pos_embed", _same, _same),
    (model_lib.GraphAttention, ("attention",)): _Rule("attention", _same, _same),
}
# PyTorch keys with no NNX counterpart: accepted on import, written as 0 on export
# (unused with momentum set; PyTorch only reads it when momentum=None).
_TORCH_ONLY = {nnx.BatchNorm: ("num_batches_tracked",)}


def _rule_for(modules: dict, path: tuple) -> tuple[tuple, _Rule] | None:
  """(owner path, rule) for a variable path; the longest relative path wins."""
  for depth in (2, 1):
    owner = modules.get(path[:-depth])
    if owner is None:
      continue
    for cls in type(owner).__mro__:
      rule = _RULES.get((cls, tuple(str(p) for p in path[-depth:])))
      if rule is not None:
        return path[:-depth], rule
  return None


def _key(owner: tuple, suffix: str) -> str:
  return ".".join([str(p) for p in owner] + [suffix])


def key_map(model: nnx.Module) -> tuple[dict[tuple, tuple[str, _Rule]], set[str]]:
  """({NNX variable path: (PyTorch key, rule)}, PyTorch-only keys) of this model."""
  modules = {tuple(p): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
  mapping, unmapped = {}, []
  for path, _ in nnx.to_flat_state(nnx.state(model)):
    found = _rule_for(modules, tuple(path))
    if found is None:
      unmapped.append("/".join(map(str, path)))
      continue
    owner, rule = found
    mapping[tuple(path)] = (_key(owner, rule.torch_name), rule)
  if unmapped:
    raise ConversionError(f"no PyTorch layout rule for NNX variables {unmapped}")
  extra = {_key(p, name) for p, node in modules.items()
           for cls, names in _TORCH_ONLY.items() if isinstance(node, cls) for name in names}
  return mapping, extra


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):   # a torch.Tensor, without importing torch
    return value.detach().cpu().numpy()
  return np.asarray(value)


def nnx_to_torch(model: nnx.Module) -> dict[str, np.ndarray]:
  """The PyTorch-layout state_dict (NumPy arrays) of `model`'s parameters and statistics."""
  mapping, extra = key_map(model)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    key, rule = mapping[tuple(path)]
    out[key] = np.array(rule.to_torch(np.asarray(var[...])), copy=True, order="C")
  for key in extra:
    out[key] = np.zeros((), np.int64)
  return dict(sorted(out.items()))


def _listing(items: list[str], limit: int = 12) -> str:
  more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def torch_to_nnx(state_dict: dict, model: nnx.Module) -> nnx.Module:
  """Loads a PyTorch-layout state_dict into `model` (in place) and returns it.

  Raises ConversionError listing every missing, unknown and mis-shaped key at once.
  """
  mapping, extra = key_map(model)
  given = {str(k): v for k, v in state_dict.items()}
  expected = {key for key, _ in mapping.values()}
  missing = sorted(expected - set(given))
  unknown = sorted(set(given) - expected - extra)
  misshaped, updates = [], []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    key, rule = mapping[tuple(path)]
    if key not in given:
      continue
    value = rule.to_nnx(_to_numpy(given[key]))
    if value.shape != tuple(var.shape):
      misshaped.append(f"{key} {tuple(_to_numpy(given[key]).shape)} "
                       f"(expected {tuple(rule.to_torch(np.zeros(var.shape)).shape)})")
      continue
    updates.append((path, var.replace(jnp.asarray(value, var.dtype))))
  problems = [f"{len(items)} {name}: {_listing(items)}" for name, items in
              (("missing", missing), ("unknown", unknown), ("mis-shaped", misshaped)) if items]
  if problems:
    raise ConversionError("state_dict does not fit the configured model: " + "; ".join(problems))
  nnx.update(model, nnx.State.from_flat_path(updates))
  return model


# -- files --------------------------------------------------------------------------------
def load_torch_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A state_dict from a PyTorch file, never running code from it (weights_only=True).

  Accepts a plain state_dict or one under "state_dict" / "model".
  """
  import torch  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such PyTorch checkpoint file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(f"{path}: refused to load (only tensors are accepted, "
                          f"torch.load(weights_only=True)): {first}") from None
  if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
    obj = next(iter(obj.values()))
  if not isinstance(obj, dict) or not all(hasattr(v, "detach") for v in obj.values()):
    raise ConversionError(f"{path}: expected a state_dict (a dict of tensors), "
                          f"got {type(obj).__name__}")
  return {str(k): _to_numpy(v) for k, v in obj.items()}


def save_torch_state_dict(state_dict: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, str(path))


def abstract_model(config) -> nnx.Module:
  """The configured model with shape-only leaves: every leaf is then filled from a file."""
  return nnx.eval_shape(lambda: model_lib.build_model(config.model, rngs=nnx.Rngs(0)))


def _abstract_state(config, model: nnx.Module):
  """The restore target of a fold checkpoint of `model` (shapes and shardings only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top
  mesh = ts.make_mesh(config.mesh)
  _, params, rest = ts.split_model(model)
  tx = ts.make_optimizer(config.train)
  state = jax.eval_shape(lambda p, r: ts.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32), params=p, model_state=r,
      opt_state=tx.init(p), rng=jax.random.key_data(jax.random.key(0))), params, rest)
  return state, mesh


def _fresh_state(config, model: nnx.Module):
  """A step-0 TrainState around `model`'s weights, replicated on the configured mesh."""
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top
  mesh = ts.make_mesh(config.mesh)
  _, params, rest = ts.split_model(model)
  tx = ts.make_optimizer(config.train)
  return ts.init_train_state(params, rest, tx, int(config.seed), mesh), mesh


def write_checkpoint(config, model: nnx.Module, directory: str | pathlib.Path,
                     source: str = "") -> None:
  """Saves `model` as step 0 of a fold's checkpoints (both `last` and `best`)."""
  from rst2g_jax import checkpointing  # pylint: disable=g-import-not-at-top
  state, _ = _fresh_state(config, model)
  meta = {"best_dsc": -1.0, "best_step": -1, "train_seconds": 0.0, "converted_from": source}
  ckpt = checkpointing.FoldCheckpoints(directory, keep=int(config.train.keep_checkpoints),
                                       async_save=False)
  if ckpt.latest_step() is not None or ckpt.best_step() is not None:
    ckpt.close()
    raise ConversionError(f"{directory}: already holds checkpoints; give an empty --output")
  ckpt.save_last(0, state, None, meta)
  ckpt.save_best(0, state, meta)
  ckpt.wait()
  ckpt.close()


def read_checkpoint(config, directory: str | pathlib.Path) -> nnx.Module:
  """The configured model with the weights of `directory`'s best (else newest) checkpoint."""
  from rst2g_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top
  if not pathlib.Path(directory).is_dir():
    raise ConversionError(f"{directory}: no such checkpoint directory")
  model = abstract_model(config)
  state, mesh = _abstract_state(config, model)
  ckpt = checkpointing.FoldCheckpoints(directory, async_save=False)
  try:
    if ckpt.best_step() is not None:
      restored, _ = ckpt.restore_best(ts.abstract_state(state, mesh))
    elif ckpt.latest_step() is not None:
      restored, _ = ckpt.restore_last(ts.abstract_state(state, mesh))
    else:
      raise ConversionError(f"{directory}: no checkpoint (expected last/<step> or best/<step>)")
  finally:
    ckpt.close()
  nnx.update(model, restored.params, restored.model_state)
  return model


def convert(config, torch_checkpoint: str, output: str, *, to_torch: bool = False) -> None:
  if to_torch:
    save_torch_state_dict(nnx_to_torch(read_checkpoint(config, output)), torch_checkpoint)
    return
  state_dict = load_torch_state_dict(torch_checkpoint)
  model = torch_to_nnx(state_dict, abstract_model(config))
  write_checkpoint(config, model, output, source=pathlib.Path(torch_checkpoint).name)


def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    convert(_CONFIG.value, f.torch_checkpoint, f.output, to_torch=f.to_torch)
  except ConversionError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(1)
  direction = "->" if not f.to_torch else "<-"
  print(f"{f.torch_checkpoint} {direction} {f.output}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                            lock_config=True)
  flags.DEFINE_string("torch_checkpoint", None, "PyTorch state_dict file (.pt): read, or "
                      "written with --to_torch.")
  flags.DEFINE_string("output", None, "Fold checkpoint directory (e.g. WORKDIR/fold_0/"
                      "checkpoints): written, or read with --to_torch.")
  flags.DEFINE_bool("to_torch", False, "Orbax -> PyTorch instead of PyTorch -> Orbax.")
  flags.mark_flags_as_required(["config", "torch_checkpoint", "output"])
  app.run(main)
