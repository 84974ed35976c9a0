"""Smoke test of `python -m rst2g_jax.bench` (JAX against the PyTorch reference) on a tiny model.

It checks the command runs end to end and prints every figure; the figures themselves are
timings and are not asserted (speed comes from benchmark runs, README "CPU performance").
"""
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def test_bench_prints_every_figure_and_the_speedup_last():
  proc = subprocess.run(
      [sys.executable, "-m", "rst2g_jax.bench", "--config=tests/tiny_config.py", "--steps=2",
       "--torch_compile=false", "--volume_slices=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  # tiny_config: 32x32 slices, batch 2 slabs x 4 slices.
  assert re.match(r"config rst2g image 32x32, batch 2 slabs x 4 slices; jax .* torch .* with "
                  r"\d+ threads$", lines[0]), lines[0]
  expected = [
      rf"jax train step: +{_NUMBER} ms +\(CPU {_NUMBER} ms; compile {_NUMBER} s\)",
      rf"torch eager train step: +{_NUMBER} ms +\(CPU {_NUMBER} ms\)",
      rf"jax whole volume \(8 slices\): +{_NUMBER} ms",
      rf"torch whole volume \(8 slices\): +{_NUMBER} ms",
      rf"jax compiled train step memory: peak ~{_NUMBER} MiB \(arguments .*\)",
      rf"jax_vs_torch_eager_inference_speedup: {_NUMBER}",
  ]
  for pattern in expected:
    found = [re.fullmatch(pattern, line) for line in lines]
    match = next((m for m in found if m), None)
    assert match is not None, f"no line matches {pattern!r} in:\n{proc.stdout}"
    assert all(float(value) > 0 for value in match.groups()), match.group(0)
  assert not any("torch.compile" in line for line in lines)   # --torch_compile=false
  last = re.fullmatch(rf"jax_vs_torch_eager_train_speedup: {_NUMBER}", lines[-1])
  assert last is not None, lines[-1]
  assert float(last.group(1)) > 0
