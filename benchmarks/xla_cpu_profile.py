"""Where the JAX train step's time goes on XLA:CPU: per-op and per-kind figures from a profile.

  python benchmarks/xla_cpu_profile.py --config=configs/synthetic.py [--batch=2] [--steps=10]
      [--top=30] [--hlo_out=/tmp/step.hlo.txt]
  python benchmarks/xla_cpu_profile.py --ablate [--steps=20]

Compiles the step `python -m rst2g_jax.bench` times (rst2g_jax.bench.build_jax_train: the
paper's loss, Adam, one device), times `--steps` steps (median wall and CPU time), then runs
`--profile_steps` more under `jax.profiler.trace` and sums the trace's XLA thunk events
(one per HLO instruction the CPU runtime executes) per step. Prints:
- the per-step op time (summed over XLA's threads, so it can exceed the wall time);
- that time by kind: the HLO opcode, the fusion kind (`ynn_fusion` = an XNNPACK/YNNPACK
  dot or conv, `transpose_copy_fusion` = a layout copy, ...) and the pass
  (`fwd` forward, `bwd` backward, from the op's metadata);
- that time by part of the network (encoder, ViT, MSR, STGE, decoder, loss; named scopes
  added here around those modules' calls) and pass;
- the `--top` single ops with their shape and the JAX primitive they came from.
The compiled HLO text (`--hlo_out`) names the same instructions, for a closer look.
XLA_FLAGS set in the environment apply (the flags experiments of README "CPU performance").

`--ablate` instead compiles the step once as is and once with each CPU rewrite of
rst2g_jax/layers.py undone (back to the plain nnx layer), and with all of them undone, in one
process, and times them round-robin (`--steps` rounds), so that other load on the machine
affects every variant alike. The rewrites give the same values and gradients as the plain
layers (tests/test_torch_parity.py compares both against PyTorch).
"""
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rst2g_jax import bench, layers, losses  # noqa: E402
from rst2g_jax import model as model_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 0, "Slabs per train step (0: config.train.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 5, "Steps traced by the profiler "
                                      "(0: time only).")
_TOP = flags.DEFINE_integer("top", 30, "Single ops to list.")
_HLO_OUT = flags.DEFINE_string("hlo_out", "", "Write the compiled HLO text here.")
_ABLATE = flags.DEFINE_bool("ablate", False, "Time the step with each layers.py CPU rewrite "
                             "undone, round-robin, instead of profiling.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "", "Keep the profiler trace here (TensorBoard/"
                                 "Perfetto); default: a temporary directory.")

# Modules (and the loss) whose ops are labelled with a jax.named_scope for the per-part table.
_SCOPED = {"encoder": (model_lib.CFormerEncoder, "__call__"), "vit": (model_lib.ViT, "__call__"),
           "msr": (model_lib.MultiScaleRefinement, "__call__"), "stge": (model_lib.STGE, "__call__"),
           "decoder": (layers.CDecoder, "__call__"), "loss": (losses, "rst2g_loss")}


# Each CPU rewrite in layers.py and the plain nnx call it replaces (the faithful original).
_PLAIN = {
    "max_pool2": lambda x: nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2)),
    "conv_transpose2x2": lambda up, x: up(x),
    "_is_pointwise": lambda conv: False,   # apply_conv: 1x1 convs as convolutions
}


@contextlib.contextmanager
def plain_layers(names):
  """Swaps the named layers.py rewrites for their plain nnx forms while a step is traced."""
  saved = {name: getattr(layers, name) for name in names}
  try:
    for name in names:
      setattr(layers, name, _PLAIN[name])
    yield
  finally:
    for name, fn in saved.items():
      setattr(layers, name, fn)


def ablate(config, x, y, steps: int) -> None:
  """Round-robin step times with each rewrite undone, and all undone, against the current code."""
  variants = {"current": ()}
  variants.update({f"plain {name}": (name,) for name in _PLAIN})
  variants["all plain (original)"] = tuple(_PLAIN)
  trains = {}
  for label, names in variants.items():
    with plain_layers(names):
      trains[label] = bench.build_jax_train(config, x, y)
    for _ in range(3):
      trains[label].step()
  times = {label: [] for label in trains}
  cpu = {label: [] for label in trains}
  for _ in range(steps):
    for label, train in trains.items():
      start, cpu_start = time.perf_counter(), time.process_time()
      train.step()
      times[label].append(time.perf_counter() - start)
      cpu[label].append(time.process_time() - cpu_start)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load {os.getloadavg()[0]:.2f}; "
        f"median of {steps} round-robin steps")
  base = np.median(times["current"])
  for label in trains:
    wall = np.median(times[label])
    print(f"  {label:28s} {wall * 1e3:7.1f} ms (CPU {np.median(cpu[label]) * 1e3:6.1f} ms)  "
          f"x{wall / base:.2f} of current")


def label_parts() -> None:
  """Wraps each _SCOPED callable in a named scope, so that its ops' op_name metadata names it."""
  for label, (owner, attr) in _SCOPED.items():
    fn = getattr(owner, attr)

    def scoped(*args, __fn=fn, __label=label, **kwargs):
      with jax.named_scope(f"part_{__label}"):
        return __fn(*args, **kwargs)

    setattr(owner, attr, scoped)


def op_part(info) -> str:
  """The innermost labelled part an op belongs to (`rest`: optimizer, glue, unlabelled copies)."""
  parts = re.findall(r"part_(\w+)", info[2]) if info else []
  return parts[-1] if parts else "rest"


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (shape, opcode, op_name metadata) for every instruction in the text."""
  out = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      op_name = _OP_NAME.search(line)
      out[match.group(1)] = (match.group(2), match.group(3), op_name.group(1) if op_name else "")
  return out


def thunk_times(trace_dir: str) -> dict[str, float]:
  """Total microseconds per XLA op name over all XLA threads of the trace in `trace_dir`."""
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins/profile/*/perfetto_trace.json.gz")))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  totals = collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X" or not threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA"):
      continue
    name = e["name"]
    if name.startswith(("ThunkExecutor", "$", "SlinkyThreadPool")):   # wrappers and waits
      continue
    totals[name] += e["dur"]
  return totals


def op_pass(info) -> str:
  """`fwd` or `bwd` from the op's metadata (autodiff's backward ops are under `transpose(`)."""
  op_name = info[2] if info else ""
  if not op_name:
    return "(no metadata)"
  return "bwd" if "transpose(" in op_name else "fwd"


def op_kind(name: str, info) -> str:
  """`<fusion kind or opcode> <pass>`: the op name without its number, and op_pass."""
  base = re.sub(r"[.]\d+$", "", name)
  return f"{base} {op_pass(info)}"


def main(argv):
  del argv
  config = _CONFIG.value
  batch = _BATCH.value or int(config.train.batch_size)
  slab = int(config.data.slab)
  h, w = model_lib.image_size(config.model)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, slab, h, w, 3)).astype(np.float32)
  y = (rng.uniform(size=(batch, slab, h, w)) > 0.8).astype(np.float32)
  if _ABLATE.value:
    ablate(config, x, y, _STEPS.value)
    return
  label_parts()
  train = bench.build_jax_train(config, x, y)
  hlo_text = train.compiled.as_text()
  if _HLO_OUT.value:
    with open(_HLO_OUT.value, "w") as f:
      f.write(hlo_text)
  for _ in range(3):
    train.step()
  times, cpu = [], []
  for _ in range(_STEPS.value):
    start, cpu_start = time.perf_counter(), time.process_time()
    train.step()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  print(f"config {config.model.name} {h}x{w}, batch {batch}x{slab}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; compile {train.compile_s:.1f} s; load "
        f"{os.getloadavg()[0]:.2f}")
  print(f"step median {np.median(times) * 1e3:.1f} ms (min {np.min(times) * 1e3:.1f}), "
        f"CPU {np.median(cpu) * 1e3:.1f} ms over {len(times)} steps")
  n = _PROFILE_STEPS.value
  if n <= 0:
    return
  with tempfile.TemporaryDirectory() as tmp_dir:
    trace_dir = _TRACE_DIR.value or tmp_dir
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(n):
        train.step()
    totals = thunk_times(trace_dir)
  info = hlo_instructions(hlo_text)
  per_step = {name: us / n / 1e3 for name, us in totals.items()}
  print(f"op time per step (all XLA threads): {sum(per_step.values()):.1f} ms in "
        f"{len(per_step)} ops")
  kinds = collections.defaultdict(float)
  for name, ms in per_step.items():
    kinds[op_kind(name, info.get(name))] += ms
  parts = collections.defaultdict(float)
  for name, ms in per_step.items():
    parts[f"{op_part(info.get(name))} {op_pass(info.get(name))}"] += ms
  print("by part (named scopes; `rest` includes layout copies without metadata):")
  for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
    print(f"  {ms:8.2f} ms  {part}")
  print("by kind:")
  for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:25]:
    print(f"  {ms:8.2f} ms  {kind}")
  print(f"top {_TOP.value} ops:")
  for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    shape, opcode, op_name = info.get(name, ("?", "?", ""))
    print(f"  {ms:8.2f} ms  {name:32s} {opcode:12s} {shape[:48]:48s} {op_name[-60:]}")


if __name__ == "__main__":
  app.run(main)
