"""Parameter count and forward FLOPs per slab of the configured model.

  python -m rst2g_jax.summary --config=configs/nact.py

Nothing is allocated: the model is built with `nnx.eval_shape` and the forward pass is
compiled on abstract inputs, so the paper-size model is summarised on a laptop.
The last line printed is `params: <integer>`.
"""
import collections

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags
from flax import nnx

from rst2g_jax import model as model_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)


def abstract_model(model_cfg, *, dtype=jnp.float32) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves instead of arrays (no memory used)."""
  return nnx.eval_shape(lambda: model_lib.build_model(model_cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def count_params(module: nnx.Module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def param_breakdown(module: nnx.Module) -> dict[str, int]:
  """Parameters per part, keyed like 'encoder/stem', 'encoder/downs/0', 'msr/1', 'stge/ita'.

  A part is a child of a top-level attribute; list items keep their index.
  """
  counts = collections.OrderedDict()
  for path, leaf in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    depth = 3 if len(path) > 3 and isinstance(path[2], int) else 2
    name = "/".join(str(p) for p in path[:min(depth, len(path) - 1)])
    counts[name] = counts.get(name, 0) + int(leaf.size)
  return dict(sorted(counts.items(), key=lambda item: _flow_order(item[0])))


# Data-flow order of the parts (nnx.eval_shape rebuilds modules with sorted attributes).
_FLOW_ORDER = ("encoder", "stem", "downs", "vit", "msr", "stge", "isa_pre", "isa_post",
               "isa_res", "ita", "decoder", "ups", "head")


def _flow_order(name: str) -> tuple:
  return tuple((0, int(part), "") if part.isdigit() else
               (1, _FLOW_ORDER.index(part), "") if part in _FLOW_ORDER else (2, 0, part)
               for part in name.split("/"))


def forward_flops(module: nnx.Module, input_shape, dtype=jnp.float32) -> float:
  """FLOPs of one eval-mode forward pass on `input_shape`, from XLA's cost analysis."""
  graphdef, state = nnx.split(module)

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  compiled = jax.jit(forward).lower(state, x).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX returned one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def summarize(config, *, flops: bool = True) -> list[str]:
  """The report's lines; the last is `params: <integer>`."""
  model_cfg = config.model
  model = abstract_model(model_cfg)
  total = count_params(model)
  h, w = model_lib.image_size(model_cfg)
  lines = [f"model: {model_cfg.name}  stem {model_cfg.stem_features}  features "
           f"{tuple(model_cfg.features)}  image {h}x{w}"]
  breakdown = param_breakdown(model)
  tops = collections.OrderedDict()
  for name, n in breakdown.items():
    tops.setdefault(name.split("/")[0], []).append((name, n))
  for top, parts in tops.items():
    top_total = sum(n for _, n in parts)
    lines.append(f"  {top:<22s} {top_total:>12,d}  {100 * top_total / total:5.1f} %")
    for name, n in parts:
      if name != top:
        lines.append(f"    {name:<20s} {n:>12,d}")
  if flops:
    shape = (1, config.data.slab, h, w, 3)
    f = forward_flops(model, shape)
    lines.append(f"forward FLOPs per slab {shape}: {f:.4g} ({f / 1e9:.2f} GFLOP)")
  lines.append(f"params: {total}")
  return lines


def main(argv):
  del argv
  print("\n".join(summarize(_CONFIG.value)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
