"""Shared test setup: eight virtual CPU devices, the real DICOM sample, a tiny trained work directory."""
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


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """JAX's persistent compilation cache, shared by the session's workers and subprocesses."""
  import jax  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.getbasetemp().parent / "rst2g_jax_cache"
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  """The tiny synthetic collection, built once per session."""
  from tfds_builders import build
  path = tmp_path_factory.mktemp("tfds")
  build.build("synthetic_dce", data_dir=str(path), config="tiny", progress=False)
  return path


@pytest.fixture(scope="session")
def trained_workdir(tiny_data, compile_cache, tmp_path_factory):
  """A tiny RST2G trained for 4 steps on both folds (an ensemble of two), once per session."""
  from rst2g_jax import train  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  config.data.data_dir = str(tiny_data)
  config.cv.folds = ""
  work = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(config, work)
  return work
