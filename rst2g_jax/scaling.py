"""Weak and strong scaling of the compiled train step over 1, 2, 4, ... devices.

  python -m rst2g_jax.scaling --config=configs/synthetic.py --devices=1,2,4,8
      --global_batch=8 --out=DIR [--steps=10] [--mode=weak|strong|both]

For each device count d the model, optimizer state and step are made exactly as
training makes them (`train.make_programs` on a 1-D "data" mesh of the first d
devices: state replicated, batch split), the step is compiled ahead of time and
`steps` steps are timed after a warm-up. Modes:

- strong: the global batch is `--global_batch` at every d (each device gets
  global_batch/d slabs); efficiency(d) = t(d0) * d0 / (t(d) * d).
- weak: each device gets `--global_batch` slabs (the d=1 batch), so the global
  batch is global_batch * d; efficiency(d) = t(d0) / t(d).

d0 is the smallest device count measured (1 when it is in the list), so the
efficiency at d0 is 1. Writes DIR/scaling.csv (one row per count and mode) and
DIR/scaling.png. On one host, virtual CPU devices share the same cores, so CPU
"efficiency" mostly measures partitioning overhead, not real scaling.
"""
from __future__ import annotations

import csv
import os
import pathlib
import re
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from rst2g_jax import cli_errors

MODES = ("strong", "weak")

# Dense peak FLOP/s per device by (device_kind substring, compute dtype); vendor figures
# (H100/H200: SXM). The one table for every MFU in the project (scaling, benchmarks/gpu_bench).
# float32 on NVIDIA is the non-tensor-core FP32 rate; XLA may use TF32 tensor cores for f32
# convolutions and matmuls on these GPUs (so f32 MFU can exceed 1), hence the "tfloat32" rows,
# which gpu_bench reports beside the FP32 figure.
PEAK_FLOPS = (
    ("H200", "bfloat16", 989e12), ("H200", "float32", 67e12), ("H200", "tfloat32", 494.7e12),
    ("H100", "bfloat16", 989e12), ("H100", "float32", 67e12), ("H100", "tfloat32", 494.7e12),
    ("A100", "bfloat16", 312e12), ("A100", "float32", 19.5e12), ("A100", "tfloat32", 156e12),
    ("V100", "float32", 15.7e12),
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5e", "bfloat16", 197e12), ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6", "bfloat16", 918e12),
)

CPU_NOTE = ("virtual CPU devices share this host's cores: efficiency measures partitioning "
            "overhead, not scaling")

FIELDS = ("mode", "devices", "global_batch", "per_device_batch", "step_time_s", "step_time_min_s",
          "slices_per_s", "efficiency", "argument_bytes", "output_bytes", "temp_bytes",
          "alias_bytes", "peak_bytes_estimate", "flops_per_step", "flops_per_device",
          "device_kind", "dtype", "peak_flops_per_device", "mfu", "notes")


class ScalingError(ValueError):
  """A scaling request that cannot run (no device count fits, bad flags); one-line message."""


class SkipCount(Exception):
  """One device count cannot be measured here; the message says why (printed, row skipped)."""


def _host_available_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (Linux), else None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak FLOP/s for `dtype`, or None when not in the table."""
  for kind, kind_dtype, peak in PEAK_FLOPS:
    if kind.lower() in device_kind.lower() and kind_dtype == dtype:
      return peak
  return None


def memory_analysis(compiled) -> dict[str, int]:
  """XLA's per-device memory analysis of the compiled step (bytes)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {k: "" for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                            "peak_bytes_estimate")}
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  temp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
  peak = arg + out + temp - alias   # donated inputs aliased to outputs count once
  return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
          "peak_bytes_estimate": peak}


def lowered_flops(lowered) -> float:
  """FLOPs of one global step, from XLA's cost analysis of the unpartitioned program.

  The compiled (partitioned) program's cost analysis is not a clean per-device count
  on CPU (it mixes global and per-shard shapes), so FLOPs per device = global / d.
  """
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX: one dict per computation
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


def measure_step(config, devices: int, global_batch: int, steps: int, *, warmup: int = 2,
                 seed: int = 0, programs=None) -> dict:
  """Compiles and times the training step on the first `devices` devices (one row, no efficiency).

  `programs`: `train.make_programs(config, mesh)` already made on that mesh, reused (its
  compiled init included) instead of made again.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top

  mesh = ts.make_mesh(ml_collections.ConfigDict({"data": devices}))
  if programs is None:
    programs = train.make_programs(config, mesh)
  h, w = config.model.image_size
  slab = int(config.data.slab)
  shape = (global_batch, slab, int(h), int(w), 3)
  start = time.perf_counter()
  compiled = programs.compiled_step(shape, mesh)
  compile_s = time.perf_counter() - start
  memory = memory_analysis(compiled)
  if mesh.devices.flat[0].platform == "cpu" and memory["peak_bytes_estimate"] != "":
    # Virtual CPU devices share host memory: d devices need d times the per-device peak.
    need, available = memory["peak_bytes_estimate"] * devices, _host_available_bytes()
    if available is not None and need > 0.8 * available:
      raise SkipCount(f"{devices} x {memory['peak_bytes_estimate'] / 2**20:.0f} MiB per device "
                      f"exceeds 80% of the host's {available / 2**20:.0f} MiB available")

  rng = np.random.default_rng(seed)
  sharding = ts.batch_sharding(mesh)
  image = jax.device_put(rng.standard_normal(shape, np.float32), sharding)
  mask = jax.device_put((rng.random(shape[:-1]) < 0.1).astype(np.float32), sharding)
  state = programs.init(seed)
  flops = lowered_flops(programs.step.lower(state, image, mask))   # traced again, not run
  for _ in range(warmup):
    state, metrics = compiled(state, image, mask)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, image, mask)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss"])):
    raise ScalingError(f"non-finite loss on {devices} device(s); the timing would be meaningless")

  step_time = float(np.median(times))
  flops_device = flops / devices
  device = mesh.devices.flat[0]
  dtype = str(config.train.dtype)
  peak = peak_flops(device.device_kind, dtype)
  notes = []
  if device.platform == "cpu" and devices > 1:
    notes.append(CPU_NOTE)
  if peak is None:
    notes.append(f"MFU empty: peak FLOP/s of {device.device_kind!r} in {dtype} unknown")
  return {"devices": devices, "global_batch": global_batch,
          "per_device_batch": global_batch // devices, "step_time_s": step_time,
          "step_time_min_s": float(np.min(times)),
          "slices_per_s": global_batch * slab / step_time, **memory,
          "flops_per_step": flops, "flops_per_device": flops_device,
          "device_kind": device.device_kind, "dtype": dtype,
          "peak_flops_per_device": peak if peak is not None else "",
          "mfu": flops_device / step_time / peak if peak else "", "notes": "; ".join(notes),
          "compile_s": compile_s}   # not a CSV field


def _efficiency(rows: list[dict], mode: str) -> None:
  """Fills `efficiency` relative to the smallest device count measured in this mode."""
  if not rows:
    return
  base = min(rows, key=lambda r: r["devices"])
  for r in rows:
    if mode == "strong":
      r["efficiency"] = base["step_time_s"] * base["devices"] / (r["step_time_s"] * r["devices"])
    else:
      r["efficiency"] = base["step_time_s"] / r["step_time_s"]


def run_scaling(config, device_counts: Sequence[int], *, global_batch: int, steps: int,
                out_dir, modes: Sequence[str] = MODES) -> list[dict]:
  """Measures every (mode, device count), writes scaling.csv and scaling.png, returns the rows.

  Counts above the available devices, strong-scaling counts that do not divide
  `global_batch`, and (virtual CPU devices) counts whose summed per-device peak memory
  would exceed 80% of the host's available memory are skipped with a printed reason;
  ScalingError when nothing runs.
  """
  import jax  # pylint: disable=g-import-not-at-top
  counts = sorted({int(d) for d in device_counts})
  if not counts or counts[0] < 1:
    raise ScalingError(f"--devices={list(device_counts)}: expected positive device counts")
  if global_batch < 1 or steps < 1:
    raise ScalingError(f"global_batch={global_batch}, steps={steps}: both must be >= 1")
  bad_modes = [m for m in modes if m not in MODES]
  if bad_modes or not modes:
    raise ScalingError(f"mode {bad_modes or modes}: expected 'weak', 'strong' or both")
  available = len(jax.devices())
  rows: list[dict] = []
  measured: dict[tuple[int, int], dict] = {}   # (devices, batch) -> row; weak d=1 == strong d=1
  for mode in modes:
    mode_rows = []
    for d in counts:
      batch = global_batch if mode == "strong" else global_batch * d
      if d > available:
        print(f"skip {mode} d={d}: only {available} {jax.default_backend()} device(s) here",
              flush=True)
        continue
      if batch % d:
        print(f"skip {mode} d={d}: global batch {batch} is not divisible by {d} devices",
              flush=True)
        continue
      if (d, batch) not in measured:
        try:
          measured[(d, batch)] = measure_step(config, d, batch, steps)
        except SkipCount as e:
          print(f"skip {mode} d={d}: {e}", flush=True)
          continue
      row = {"mode": mode, **measured[(d, batch)]}
      print(f"{mode} d={d}: batch {batch}, step {row['step_time_s'] * 1e3:.1f} ms, "
            f"{row['slices_per_s']:.1f} slices/s", flush=True)
      mode_rows.append(row)
    _efficiency(mode_rows, mode)
    rows.extend(mode_rows)
  if not rows:
    raise ScalingError(f"no device count in {counts} fits: global batch {global_batch} on "
                       f"{available} device(s)")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  write_csv(rows, out / "scaling.csv")
  plot(rows, out / "scaling.png")
  return rows


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: r.get(k, "") for k in FIELDS})


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """Step time and efficiency against device count, one line per mode."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_time, ax_eff) = plt.subplots(1, 2, figsize=(9, 3.5))
  for mode in MODES:
    mode_rows = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["devices"])
    if not mode_rows:
      continue
    d = [r["devices"] for r in mode_rows]
    ax_time.plot(d, [r["step_time_s"] * 1e3 for r in mode_rows], "o-", label=mode)
    ax_eff.plot(d, [r["efficiency"] for r in mode_rows], "o-", label=mode)
  ax_time.set(xlabel="devices", ylabel="step time (ms, median)", xscale="log", title="step time")
  ax_eff.set(xlabel="devices", ylabel="efficiency vs smallest count", xscale="log",
             title="scaling efficiency")
  ax_eff.axhline(1.0, color="gray", lw=0.5)
  for ax in (ax_time, ax_eff):
    ax.set_xticks(sorted({r["devices"] for r in rows}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary_lines(rows: list[dict]) -> list[str]:
  lines = [f"{'mode':<7}{'dev':>4}{'batch':>6}{'step ms':>10}{'slices/s':>10}{'eff':>7}"
           f"{'peak MiB':>10}{'GFLOP/dev':>11}{'MFU':>7}"]
  for r in rows:
    mfu = f"{r['mfu']:.3f}" if r["mfu"] != "" else "-"
    peak = r["peak_bytes_estimate"]
    lines.append(f"{r['mode']:<7}{r['devices']:>4}{r['global_batch']:>6}"
                 f"{r['step_time_s'] * 1e3:>10.1f}{r['slices_per_s']:>10.1f}{r['efficiency']:>7.2f}"
                 f"{(peak / 2**20 if peak != '' else float('nan')):>10.1f}"
                 f"{r['flops_per_device'] / 1e9:>11.2f}{mfu:>7}")
  notes = sorted({n for r in rows for n in r["notes"].split("; ") if n})
  lines += [f"note: {n}" for n in notes]
  return lines


# -- command line ------------------------------------------------------------------------------
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); --config.<section>.<field>=... "
    "overrides (e.g. --config.train.dtype=bfloat16).", flag_values=FLAGS, lock_config=True)
_DEVICES = flags.DEFINE_list(
    "devices", ["1", "2", "4", "8"],
    "Device counts to measure (sub-meshes of the first d devices). On a CPU-only host the "
    "command sets XLA_FLAGS=--xla_force_host_platform_device_count=<max> itself (before JAX "
    "starts) so that virtual CPU devices exist; on GPU/TPU hosts the real devices are used.",
    flag_values=FLAGS)
_GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch", None, "Strong scaling: slabs per step at every count. Weak scaling: slabs "
    "per device (global batch = this x devices).", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after 2 warm-up steps.", flag_values=FLAGS)
_MODE = flags.DEFINE_enum("mode", "both", ["weak", "strong", "both"], "Which scaling to measure.",
                          flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder for scaling.csv and scaling.png.",
                           flag_values=FLAGS)
flags.mark_flags_as_required(["config", "global_batch", "out"], flag_values=FLAGS)


def ensure_virtual_cpu_devices(count: int) -> None:
  """Asks XLA for `count` host devices unless XLA_FLAGS already sets a count.

  Must run before JAX starts its backends; it only affects the CPU platform, so a
  GPU/TPU host still measures its real devices.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if count > 1 and not re.search(r"--xla_force_host_platform_device_count=", current):
    os.environ["XLA_FLAGS"] = f"{current} --xla_force_host_platform_device_count={count}".strip()


def _parse(argv):
  return cli_errors.parse_flags(FLAGS, argv, doc=__doc__)


def main(argv):
  try:
    counts = [int(d) for d in _DEVICES.value]
  except ValueError:
    print(f"error: --devices={','.join(_DEVICES.value)}: expected integers like 1,2,4,8",
          file=sys.stderr)
    sys.exit(2)
  ensure_virtual_cpu_devices(max(counts, default=1))
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  modes = MODES if _MODE.value == "both" else (_MODE.value,)
  with cli_errors.one_line_errors():
    try:
      rows = run_scaling(_CONFIG.value, counts, global_batch=_GLOBAL_BATCH.value,
                         steps=_STEPS.value, out_dir=_OUT.value, modes=modes)
    except ScalingError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    print("\n".join(summary_lines(rows)))
    print(f"wrote {pathlib.Path(_OUT.value) / 'scaling.csv'} and scaling.png")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
