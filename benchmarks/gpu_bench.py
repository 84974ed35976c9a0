"""Offline accelerator benchmark: the training step in each dtype and whole-volume inference.

  python -m benchmarks.gpu_bench --config=configs/nact.py [--batch=N] [--steps=N]
      [--volume=60,256,256] [--dtypes=float32,bfloat16] [--inference_runs=3]

For each dtype (the config's `train.dtype` set to it):

- train: the step exactly as training builds and compiles it (`scaling.measure_step`, i.e.
  `train.make_programs` on one device): median step time after compilation and warm-up,
  slices/s, FLOPs per step from XLA's cost analysis, MFU against the device's dense peak
  (`scaling.PEAK_FLOPS`; for float32 also against the TF32 peak), XLA's memory analysis and
  the device's peak memory in use.
- inference: a random normalised volume of `--volume` (S,H,W; H,W = the model's image size)
  through training's whole-volume evaluation (`train.Evaluator`: sliding slabs with the
  config's eval.slab_step / blend / batch_size, jitted predict of `train_state.make_predict_fn`),
  timed end to end after a warm-up that compiles the predict function; FLOPs, MFU, peak memory.

Each dtype runs in its own child process, since the device's peak memory in use
(`memory_stats()["peak_bytes_in_use"]`) cannot be reset: inference runs first, so its peak is
its own; the train figure is the process peak after training (training needs more than
inference at the same batch; if the train step did not raise the peak, it is marked so). The
parent never starts a JAX backend (on a GPU it would reserve memory). On CPU the device peak
is None and the child's peak resident memory (ru_maxrss) stands in, with the same order.
Prints readable lines while measuring, then one `key: value` line per figure after the line
`MARKER`.
"""
from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from rst2g_jax import cli_errors
from rst2g_jax import scaling

DTYPES = ("float32", "bfloat16")
MARKER = "== gpu_bench results (key: value) =="
RESULT_PREFIX = "gpu_bench_child_result: "
AIM = "paper aim on one H200: whole-volume 60x256x256 inference <= 0.25 s and <= 4 GB"
__doc__ = __doc__.replace("`MARKER`", f"`{MARKER}`")


class BenchError(ValueError):
  """A benchmark request that cannot run (bad flags, wrong volume size); one-line message."""


def parse_volume(spec: str, image_size: tuple[int, int]) -> tuple[int, int, int]:
  """`S,H,W` -> ints; H,W must be the model's image size (the ViT position table is sized)."""
  try:
    shape = tuple(int(v) for v in spec.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise BenchError(f"--volume={spec}: expected three positive integers S,H,W like 60,256,256")
  if shape[1:] != tuple(image_size):
    raise BenchError(f"--volume={spec}: in-plane size {shape[1]}x{shape[2]} differs from the "
                     f"model's image_size {image_size[0]}x{image_size[1]}; set "
                     "--config.model.image_size or another --volume")
  return shape


def parse_dtypes(values) -> list[str]:
  bad = [v for v in values if v not in DTYPES]
  if bad or not values:
    raise BenchError(f"--dtypes={','.join(values)}: expected a list of {' / '.join(DTYPES)}")
  return list(dict.fromkeys(values))


def _gib(n: float | None) -> float | None:
  return None if n is None else n / 2**30


def _device_peak_bytes() -> int | None:
  """The first device's peak bytes in use since the process started; None where unknown (CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _host_peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def _with_dtype(config, dtype: str):
  config = config.copy_and_resolve_references()
  config.train.dtype = dtype
  return config


def _one_device_mesh():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top
  return ts.make_mesh(ml_collections.ConfigDict({"data": 1}))


def _mfu(flops_per_s: float, device_kind: str, dtype: str) -> dict:
  """MFU against the table's peak for the dtype; float32 also against the TF32 tensor-core peak."""
  peak = scaling.peak_flops(device_kind, dtype)
  out = {"peak_tflops": peak / 1e12 if peak else None,
         "mfu": flops_per_s / peak if peak else None}
  if dtype == "float32":
    tf32 = scaling.peak_flops(device_kind, "tfloat32")
    out["mfu_vs_tf32"] = flops_per_s / tf32 if tf32 else None
    out["peak_tf32_tflops"] = tf32 / 1e12 if tf32 else None
  return out


def measure_train(config, dtype: str, *, batch: int, steps: int, warmup: int,
                  programs=None) -> dict:
  """The compiled training step of `config` in `dtype` on one device (timed by scaling).

  `programs`: `train.make_programs` of the dtype's config on one device, if already made.
  """
  config = _with_dtype(config, dtype)
  try:
    row = scaling.measure_step(config, 1, batch, steps, warmup=warmup, seed=int(config.seed),
                               programs=programs)
  except (scaling.ScalingError, scaling.SkipCount) as e:
    raise BenchError(f"train step in {dtype}: {e}") from e
  step_s = row["step_time_s"]
  flops_per_s = row["flops_per_step"] / step_s
  return {
      "device_kind": row["device_kind"], "batch": batch, "slab": int(config.data.slab),
      "steps": steps, "warmup": warmup, "step_s": step_s, "step_min_s": row["step_time_min_s"],
      "compile_s": row["compile_s"], "slices_per_s": row["slices_per_s"],
      "flops_per_step": row["flops_per_step"], "tflops": flops_per_s / 1e12,
      **_mfu(flops_per_s, row["device_kind"], dtype),
      **{k: None if row[k] == "" else row[k]   # "": no XLA memory analysis on this backend
         for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                   "peak_bytes_estimate")},
      "device_peak_bytes": _device_peak_bytes(), "host_peak_rss_bytes": _host_peak_rss_bytes()}


def make_programs(config, dtype: str):
  """Training's programs for `config` in `dtype` on one device."""
  from rst2g_jax import train  # pylint: disable=g-import-not-at-top
  return train.make_programs(_with_dtype(config, dtype), _one_device_mesh())


def measure_inference(config, dtype: str, *, volume_shape: tuple[int, int, int], runs: int,
                      programs=None) -> dict:
  """Whole-volume inference as training's evaluation does it, timed end to end."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rst2g_jax import inference  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train  # pylint: disable=g-import-not-at-top
  from rst2g_jax import train_state as ts  # pylint: disable=g-import-not-at-top

  config = _with_dtype(config, dtype)
  mesh = _one_device_mesh()
  if programs is None:
    programs = train.make_programs(config, mesh)
  state = programs.init(int(config.seed))
  slab = int(config.data.slab)
  evaluator = train.Evaluator(predict=programs.predict, mesh=mesh, eval_cfg=config.eval,
                              slab=slab, cases=[])
  batch = int(config.eval.batch_size or 1)
  volume = np.random.default_rng(int(config.seed)).standard_normal(
      volume_shape + (3,), np.float32)

  start = time.perf_counter()   # warm-up on one slab: the same call shape, so it compiles
  evaluator.probabilities(state, {"image": volume[:slab]})
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    probs = evaluator.probabilities(state, {"image": volume})
    times.append(time.perf_counter() - start)
  if probs.shape != volume_shape or not np.isfinite(probs).all():
    raise BenchError(f"inference in {dtype}: got {probs.shape} with non-finite values or a "
                     f"wrong shape; expected finite {volume_shape}")

  slabs = len(inference.slab_starts(max(volume_shape[0], slab), slab, int(config.eval.slab_step)))
  calls = math.ceil(slabs / batch)
  abstract = jax.ShapeDtypeStruct((batch, slab) + volume_shape[1:] + (3,), np.float32,
                                  sharding=ts.batch_sharding(mesh))
  flops_per_call = scaling.lowered_flops(
      programs.predict.lower(state.params, state.model_state, abstract))
  seconds = float(np.median(times))
  flops = flops_per_call * calls
  device = mesh.devices.flat[0]
  return {
      "device_kind": device.device_kind, "volume": list(volume_shape), "runs": runs,
      "seconds": seconds, "min_s": float(np.min(times)), "compile_s": compile_s,
      "slabs": slabs, "calls": calls, "batch": batch, "slab": slab,
      "slab_step": int(config.eval.slab_step), "blend": str(config.eval.blend),
      "mirror_tta": bool(config.eval.mirror_tta), "slices_per_s": volume_shape[0] / seconds,
      "flops": flops, "tflops": flops / seconds / 1e12,
      **_mfu(flops / seconds, device.device_kind, dtype),
      "device_peak_bytes": _device_peak_bytes(), "host_peak_rss_bytes": _host_peak_rss_bytes()}


# -- readable lines and key: value lines ----------------------------------------------------
def _fmt(v, spec: str) -> str:
  return "n/a" if v is None else format(v, spec)


def _peak_note(r: dict) -> str:
  """The measured peak; for train, whether it rose above the inference part that ran first."""
  key = "device_peak_bytes" if r["device_peak_bytes"] is not None else "host_peak_rss_bytes"
  if key == "device_peak_bytes":
    note = f"device peak in use {_gib(r[key]):.3f} GiB (memory_stats)"
  else:
    note = f"device peak n/a on {r['device_kind']}; process peak RSS {_gib(r[key]):.3f} GiB"
  if r.get(f"{key}_not_raised"):
    note += " (not above the inference part's peak: the step's own peak is at most this)"
  return note


def _mfu_note(r: dict, dtype: str) -> str:
  if r["mfu"] is None:
    return f"MFU n/a: peak FLOP/s of {r['device_kind']!r} in {dtype} not in scaling.PEAK_FLOPS"
  note = f"MFU {r['mfu']:.4f} of {r['peak_tflops']:.1f} TFLOP/s ({dtype} dense peak)"
  if r.get("mfu_vs_tf32") is not None:
    note += f", {r['mfu_vs_tf32']:.4f} of the TF32 peak {r['peak_tf32_tflops']:.1f} TFLOP/s"
  return note


def train_lines(dtype: str, r: dict) -> list[str]:
  mib = lambda b: _fmt(None if b is None else b / 2**20, ".1f")  # noqa: E731
  return [
      f"[{dtype}] train step: {r['step_s'] * 1e3:.2f} ms median, {r['step_min_s'] * 1e3:.2f} ms "
      f"min over {r['steps']} steps after {r['warmup']} warm-up; compile {r['compile_s']:.1f} s "
      f"({r['device_kind']})",
      f"[{dtype}] train throughput: {r['slices_per_s']:.2f} slices/s "
      f"(batch {r['batch']} slabs x {r['slab']} slices)",
      f"[{dtype}] train FLOPs: {r['flops_per_step'] / 1e9:.4g} GFLOP per step (XLA cost "
      f"analysis), {r['tflops']:.3f} TFLOP/s achieved; {_mfu_note(r, dtype)}",
      f"[{dtype}] train memory: XLA analysis arguments {mib(r['argument_bytes'])} MiB, "
      f"outputs {mib(r['output_bytes'])} MiB, temporaries {mib(r['temp_bytes'])} MiB, "
      f"aliased {mib(r['alias_bytes'])} MiB, peak estimate "
      f"{_fmt(_gib(r['peak_bytes_estimate']), '.3f')} GiB; {_peak_note(r)}"]


def inference_lines(dtype: str, r: dict) -> list[str]:
  s, h, w = r["volume"]
  return [
      f"[{dtype}] inference {s}x{h}x{w}: {r['seconds']:.4f} s median, {r['min_s']:.4f} s min "
      f"over {r['runs']} run(s) end to end; warm-up (compile) {r['compile_s']:.1f} s",
      f"[{dtype}] inference setup: {r['slabs']} slabs of {r['slab']} (step {r['slab_step']}, "
      f"{r['blend']} blend, mirror TTA {r['mirror_tta']}) in {r['calls']} call(s) of "
      f"{r['batch']}; {r['slices_per_s']:.2f} slices/s",
      f"[{dtype}] inference FLOPs: {r['flops'] / 1e9:.4g} GFLOP per volume, "
      f"{r['tflops']:.3f} TFLOP/s achieved; {_mfu_note(r, dtype)}",
      f"[{dtype}] inference memory: {_peak_note(r)}"]


def aim_line(results: dict) -> str:
  measured = "; ".join(
      f"{dtype} {r['inference']['seconds']:.3f} s, "
      + (f"{r['inference']['device_peak_bytes'] / 1e9:.2f} GB device peak"
         if r["inference"]["device_peak_bytes"] is not None else "device peak n/a")
      + f" for {'x'.join(map(str, r['inference']['volume']))} on {r['inference']['device_kind']}"
      for dtype, r in results.items())
  return f"{AIM}; measured: {measured}"


def result_keys(results: dict) -> dict[str, object]:
  """Flat `key -> value` for the machine-readable block; `results[dtype][part]` dicts."""
  keys: dict[str, object] = {}
  for dtype, parts in results.items():
    t = parts.get("train")
    if t is not None:
      keys.update({
          f"train_step_ms_{dtype}": t["step_s"] * 1e3,
          f"train_step_min_ms_{dtype}": t["step_min_s"] * 1e3,
          f"train_compile_s_{dtype}": t["compile_s"],
          f"train_batch_slabs_{dtype}": t["batch"],
          f"train_slices_per_s_{dtype}": t["slices_per_s"],
          f"train_tflop_per_step_{dtype}": t["flops_per_step"] / 1e12,
          f"train_tflops_{dtype}": t["tflops"],
          f"peak_tflops_{dtype}": t["peak_tflops"],
          f"mfu_{dtype}": t["mfu"],
          f"train_xla_argument_gib_{dtype}": _gib(t["argument_bytes"]),
          f"train_xla_output_gib_{dtype}": _gib(t["output_bytes"]),
          f"train_xla_temp_gib_{dtype}": _gib(t["temp_bytes"]),
          f"train_xla_peak_gib_{dtype}": _gib(t["peak_bytes_estimate"]),
          f"train_device_peak_gib_{dtype}": _gib(t["device_peak_bytes"]),
          f"train_host_peak_rss_gib_{dtype}": _gib(t["host_peak_rss_bytes"]),
          f"train_device_peak_not_raised_{dtype}": t["device_peak_bytes_not_raised"]})
      if dtype == "float32":
        keys[f"mfu_vs_tf32_{dtype}"] = t["mfu_vs_tf32"]
    r = parts.get("inference")
    if r is not None:
      tag = "x".join(str(v) for v in r["volume"])
      keys.update({
          f"inference_s_{tag}_{dtype}": r["seconds"],
          f"inference_min_s_{tag}_{dtype}": r["min_s"],
          f"inference_compile_s_{dtype}": r["compile_s"],
          f"inference_slices_per_s_{dtype}": r["slices_per_s"],
          f"inference_calls_{dtype}": r["calls"],
          f"inference_tflop_{dtype}": r["flops"] / 1e12,
          f"inference_tflops_{dtype}": r["tflops"],
          f"inference_mfu_{dtype}": r["mfu"],
          f"inference_peak_gib_{dtype}": _gib(r["device_peak_bytes"]),
          f"inference_host_peak_rss_gib_{dtype}": _gib(r["host_peak_rss_bytes"])})
  return keys


def key_value_lines(keys: dict[str, object]) -> list[str]:
  def fmt(v):
    if v is None or isinstance(v, (bool, int)):
      return str(v)
    return f"{v:.6g}"
  return [MARKER] + [f"{k}: {fmt(v)}" for k, v in keys.items()]


# -- processes --------------------------------------------------------------------------
def run_dtype(config, dtype: str, *, batch: int, steps: int, warmup: int, volume_shape,
              runs: int) -> dict:
  """Inference, then the train step, in `dtype` in this process; prints readable lines.

  Both use one `train.make_programs` (one compiled init). A train peak no higher than the
  inference peak is not the train step's own: `<key>_not_raised` says so.
  """
  programs = make_programs(config, dtype)
  r_inf = measure_inference(config, dtype, volume_shape=volume_shape, runs=runs,
                            programs=programs)
  print("\n".join(inference_lines(dtype, r_inf)), flush=True)
  r_train = measure_train(config, dtype, batch=batch, steps=steps, warmup=warmup,
                          programs=programs)
  for key in ("device_peak_bytes", "host_peak_rss_bytes"):
    r_train[f"{key}_not_raised"] = (None if r_train[key] is None
                                    else bool(r_train[key] <= r_inf[key]))
  print("\n".join(train_lines(dtype, r_train)), flush=True)
  return {"inference": r_inf, "train": r_train}


def run_children(argv: list[str], dtypes: list[str]) -> dict:
  """Runs each dtype in a child process of this command; returns their figures by dtype.

  A child gets this command's arguments plus `--child --dtypes=<dtype>` (absl keeps the
  last value). Its readable lines pass through; its result line is collected.
  """
  results: dict[str, dict] = {}
  for dtype in dtypes:
    cmd = [sys.executable, "-m", "benchmarks.gpu_bench", *argv[1:], "--child",
           f"--dtypes={dtype}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout:
      if line.startswith(RESULT_PREFIX):
        result = json.loads(line[len(RESULT_PREFIX):])
      else:
        print(line, end="", flush=True)
    code = proc.wait()
    if code != 0 or result is None:
      raise BenchError(f"the {dtype} run failed (exit code {code}; its error is above)")
    results[dtype] = result
  return results


# -- command line ----------------------------------------------------------------------
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); --config.<section>.<field>=... "
    "overrides (e.g. --config.eval.batch_size=4).", flag_values=FLAGS, lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 0, "Slabs per train step (0: config.train.batch_size).",
                              flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps (median reported).",
                              flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps after compilation (>= 1).",
                               flag_values=FLAGS)
_VOLUME = flags.DEFINE_string("volume", "60,256,256",
                              "Whole volume S,H,W to infer (H,W = the model's image size).",
                              flag_values=FLAGS)
_RUNS = flags.DEFINE_integer("inference_runs", 3, "Timed whole-volume passes (median reported) "
                             "after a warm-up that compiles.", flag_values=FLAGS)
_DTYPES = flags.DEFINE_list("dtypes", list(DTYPES), "Compute dtypes (train.dtype) to measure.",
                            flag_values=FLAGS)
_CHILD = flags.DEFINE_bool("child", False, "Internal: measure the single --dtypes in this "
                           "process and print its result as JSON.", flag_values=FLAGS)
flags.mark_flags_as_required(["config"], flag_values=FLAGS)


def _parse(argv):
  return cli_errors.parse_flags(FLAGS, argv, doc=__doc__)


def main(argv):
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  from rst2g_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  with cli_errors.one_line_errors():
    try:
      dtypes = parse_dtypes(_DTYPES.value)
      volume_shape = parse_volume(_VOLUME.value, model_lib.image_size(config.model))
      batch = _BATCH.value or int(config.train.batch_size)
      if batch < 1 or _STEPS.value < 1 or _WARMUP.value < 1 or _RUNS.value < 1:
        raise BenchError(f"--batch={_BATCH.value} --steps={_STEPS.value} "
                         f"--warmup={_WARMUP.value} --inference_runs={_RUNS.value}: expected "
                         "batch >= 0 (0: the config's), steps, warmup and runs >= 1")
      if _CHILD.value:
        if len(dtypes) != 1:
          raise BenchError("--child needs exactly one --dtypes value")
        r = run_dtype(config, dtypes[0], batch=batch, steps=_STEPS.value, warmup=_WARMUP.value,
                      volume_shape=volume_shape, runs=_RUNS.value)
        print(RESULT_PREFIX + json.dumps(r), flush=True)
        return
      print(f"gpu_bench: config {config.model.name} image {volume_shape[1]}x{volume_shape[2]}, "
            f"slab {config.data.slab}, train batch {batch}, dtypes {','.join(dtypes)}, volume "
            f"{'x'.join(map(str, volume_shape))}; each dtype in its own process", flush=True)
      results = run_children(sys.argv, dtypes)
    except BenchError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
  print(aim_line(results), flush=True)
  print("\n".join(key_value_lines(result_keys(results))), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
