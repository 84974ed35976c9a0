"""Shared test setup: eight virtual CPU devices and the real DICOM sample."""
import os
import pathlib

# Multi-device code is tested on virtual CPU devices; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "data" / "nact_pilot_sample"


@pytest.fixture(scope="session")
def nact_sample_dir() -> pathlib.Path:
  """The real Breast-MRI-NACT-Pilot exam; skips when absent (fails in CI)."""
  path = pathlib.Path(os.environ.get("RST2G_SAMPLE_DIR", DEFAULT_SAMPLE))
  if not (path / "UCSF-BR-06").is_dir():
    if os.environ.get("RST2G_REQUIRE_SAMPLE"):
      pytest.fail(f"RST2G_REQUIRE_SAMPLE is set but the sample is missing at {path}")
    pytest.skip(f"real DICOM sample not found at {path} (set RST2G_SAMPLE_DIR)")
  return path
