"""The scaling study: rows per device count and mode, skips, the CSV/plot, the CLI."""
import csv
import os
import pathlib
import subprocess
import sys

import pytest

from rst2g_jax import scaling
from tests import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _smaller_config():
  """tiny_config with one encoder level on 16x16 slices: a fast compile per device count."""
  config = tiny_config.get_config()
  config.unlock()
  config.model.features = (8,)
  config.model.image_size = (16, 16)
  return config


def test_peak_flops_table():
  assert scaling.peak_flops("NVIDIA H200", "bfloat16") == 989e12
  assert scaling.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 67e12
  assert scaling.peak_flops("cpu", "float32") is None


def test_no_count_fits_is_one_error(tmp_path):
  with pytest.raises(scaling.ScalingError, match="no device count"):
    scaling.run_scaling(_smaller_config(), [2, 4], global_batch=3, steps=1, out_dir=tmp_path,
                        modes=("strong",))
  assert not (tmp_path / "scaling.csv").exists()


def test_cli_strong_and_weak_on_1_2_4_virtual_devices(tmp_path):
  """The CLI sets up its own virtual CPU devices (no XLA_FLAGS given) and measures both modes.

  global_batch=2: strong runs d=1,2 (d=4 skipped: 2 slabs on 4 devices), weak runs
  d=1,2,4 with 2 slabs per device; weak d=1 is the strong d=1 measurement.
  """
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "from tests import test_scaling\n\ndef get_config():\n"
      "  return test_scaling._smaller_config()\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "rst2g_jax.scaling", f"--config={config_file}", "--devices=1,2,4",
       "--global_batch=2", "--steps=2", f"--out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skip strong d=4: global batch 2 is not divisible by 4 devices" in proc.stdout
  assert "virtual CPU devices share" in proc.stdout
  assert "wrote" in proc.stdout

  with open(out / "scaling.csv") as f:
    rows = list(csv.DictReader(f))
  got = [(r["mode"], int(r["devices"]), int(r["global_batch"])) for r in rows]
  assert got == [("strong", 1, 2), ("strong", 2, 2), ("weak", 1, 2), ("weak", 2, 4),
                 ("weak", 4, 8)]
  by = {(r["mode"], int(r["devices"])): r for r in rows}
  for r in rows:
    d, batch = int(r["devices"]), int(r["global_batch"])
    t = float(r["step_time_s"])
    assert t > 0 and float(r["step_time_min_s"]) <= t
    assert int(r["per_device_batch"]) * d == batch
    assert float(r["slices_per_s"]) == pytest.approx(batch * 4 / t, rel=1e-6)  # slab = 4
    assert int(r["argument_bytes"]) > 0 and int(r["temp_bytes"]) > 0
    assert int(r["peak_bytes_estimate"]) == (int(r["argument_bytes"]) + int(r["output_bytes"])
                                             + int(r["temp_bytes"]) - int(r["alias_bytes"]))
    assert float(r["flops_per_device"]) == pytest.approx(float(r["flops_per_step"]) / d)
    assert r["device_kind"].lower() == "cpu" and r["mfu"] == ""
    assert "MFU empty" in r["notes"]
  # Efficiency is relative to d=1 of the same mode; d=1 is the same measurement in both.
  assert float(by["strong", 1]["efficiency"]) == 1.0 == float(by["weak", 1]["efficiency"])
  assert by["strong", 1]["step_time_s"] == by["weak", 1]["step_time_s"]
  t1 = float(by["strong", 1]["step_time_s"])
  assert float(by["strong", 2]["efficiency"]) == pytest.approx(
      t1 / (2 * float(by["strong", 2]["step_time_s"])))
  assert float(by["weak", 4]["efficiency"]) == pytest.approx(
      t1 / float(by["weak", 4]["step_time_s"]))
  # FLOPs per step scale with the global batch (the same program, 2x and 4x the slabs).
  f1 = float(by["weak", 1]["flops_per_step"])
  assert f1 > 0
  assert float(by["strong", 2]["flops_per_step"]) == pytest.approx(f1, rel=1e-6)
  assert float(by["weak", 4]["flops_per_step"]) == pytest.approx(4 * f1, rel=0.05)
  png = (out / "scaling.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 5000
