"""The offline accelerator benchmark: its CLI on CPU with a tiny model, flag errors, its scripts."""
import math
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import gpu_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
# tests/tiny_config.py with one encoder level on 16x16 slices (as test_scaling.py): fast compiles.
TINY = ["--config=tests/tiny_config.py", "--config.model.features=(8,)",
        "--config.model.image_size=(16,16)"]


def _run(*args, timeout=240):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
  return subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _key_values(stdout: str) -> dict[str, str]:
  lines = stdout.splitlines()
  block = lines[lines.index(gpu_bench.MARKER) + 1:]
  pairs = [line.split(": ", 1) for line in block]
  assert all(len(p) == 2 for p in pairs), block
  return dict(pairs)


def test_cli_on_cpu_float32_and_bfloat16():
  """Both dtypes, each in its own child; the figures are positive, finite and agree."""
  proc = _run(*TINY, "--volume=6,16,16", "--steps=2", "--warmup=1", "--inference_runs=2",
              "--dtypes=float32,bfloat16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  kv = _key_values(proc.stdout)
  for dtype in ("float32", "bfloat16"):
    f = {k[:-len(dtype) - 1]: v for k, v in kv.items() if k.endswith("_" + dtype)}
    num = {k: float(v) for k, v in f.items() if v not in ("None", "True", "False")}
    for k in ("train_step_ms", "train_slices_per_s", "train_tflop_per_step", "train_tflops",
              "train_xla_argument_gib", "train_xla_temp_gib", "train_xla_peak_gib",
              "train_host_peak_rss_gib", "inference_s_6x16x16", "inference_tflop",
              "inference_slices_per_s", "inference_host_peak_rss_gib", "train_compile_s"):
      assert math.isfinite(num[k]) and num[k] > 0, (dtype, k, f[k])
    assert num["train_step_min_ms"] <= num["train_step_ms"]
    assert num["inference_min_s_6x16x16"] <= num["inference_s_6x16x16"]
    # tiny_config: train batch 2 slabs of 4 slices; the printed rates follow from the times.
    assert int(f["train_batch_slabs"]) == 2
    assert num["train_slices_per_s"] == pytest.approx(2 * 4 / (num["train_step_ms"] / 1e3),
                                                      rel=1e-4)
    assert num["train_tflops"] == pytest.approx(
        num["train_tflop_per_step"] / (num["train_step_ms"] / 1e3), rel=1e-4)
    assert num["inference_slices_per_s"] == pytest.approx(6 / num["inference_s_6x16x16"],
                                                          rel=1e-4)
    # 6 slices, slab 4, step 2: starts 0 and 2; eval.batch_size 0 -> 1 slab per call.
    assert int(f["inference_calls"]) == 2
    assert num["inference_tflops"] == pytest.approx(
        num["inference_tflop"] / num["inference_s_6x16x16"], rel=1e-4)
    # Two forward-only slabs cost less than a forward + backward step on two slabs.
    assert num["inference_tflop"] < num["train_tflop_per_step"]
    # No device memory statistics or peak FLOP/s on CPU: stated as None, not invented.
    for k in ("train_device_peak_gib", "inference_peak_gib", "mfu", "inference_mfu",
              "peak_tflops", "train_device_peak_not_raised"):
      assert f[k] == "None", (dtype, k)
  assert kv["mfu_vs_tf32_float32"] == "None"
  assert "[float32] train step:" in proc.stdout and "[bfloat16] inference 6x16x16:" in proc.stdout
  assert "measured: float32" in proc.stdout


def test_bad_volume_is_one_line_error():
  proc = _run(*TINY, "--volume=6,32,32", timeout=60)
  assert proc.returncode == 1
  assert "error: --volume=6,32,32: in-plane size 32x32 differs from the model's image_size " \
         "16x16" in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_parse_volume_and_dtypes():
  assert gpu_bench.parse_volume("60,256,256", (256, 256)) == (60, 256, 256)
  with pytest.raises(gpu_bench.BenchError, match="--volume=0,256,256"):
    gpu_bench.parse_volume("0,256,256", (256, 256))
  with pytest.raises(gpu_bench.BenchError, match="expected three positive integers"):
    gpu_bench.parse_volume("60,256", (256, 256))
  assert gpu_bench.parse_dtypes(["bfloat16", "float32", "bfloat16"]) == ["bfloat16", "float32"]
  with pytest.raises(gpu_bench.BenchError, match="expected a list of float32 / bfloat16"):
    gpu_bench.parse_dtypes(["float16"])


@pytest.mark.parametrize("script", ["prepare_wheels.sh", "run.sh"])
def test_shell_scripts_parse(script):
  path = ROOT / "benchmarks" / "gpu" / script
  proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert os.access(path, os.X_OK)
