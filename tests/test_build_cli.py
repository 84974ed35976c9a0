"""`python -m tfds_builders.build`: summary text, reuse, one-line errors and exit codes."""
import os
import pathlib
import subprocess
import sys

import pytest

from tfds_builders import build as build_lib
from tfds_builders.synthetic_dce import Builder as SyntheticBuilder

VERSION = str(SyntheticBuilder.VERSION)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "tfds_builders.build", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def one_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  return lines[0]


def test_build_prints_summary_then_reuses(tmp_path):
  first = run_cli("synthetic_dce", f"--data_dir={tmp_path}", "--config=tiny", "--num_shards=3")
  assert first.returncode == 0, first.stderr
  assert f"synthetic_dce/tiny:{VERSION} built in" in first.stdout
  assert "cases written: 6" in first.stdout and "cases skipped: 0" in first.stdout
  assert "shards: 3" in first.stdout
  version_dir = tmp_path / "synthetic_dce" / "tiny" / VERSION
  assert len(list(version_dir.glob("*.array_record-*-of-00003"))) == 3
  size = sum(p.stat().st_size for p in version_dir.iterdir())
  assert f"bytes: {size:,} on disk" in first.stdout
  assert "6/6" in first.stderr                                 # the progress bar over cases
  again = run_cli("synthetic_dce", f"--data_dir={tmp_path}", "--config=tiny")
  assert again.returncode == 0 and "reused existing dataset" in again.stdout


@pytest.mark.parametrize("args, expected", [
    (("no_such_builder",), "unknown builder 'no_such_builder'; available: "),
    (("synthetic_dce", "--on_bad_case=maybe"), "--on_bad_case=maybe: value should be one of <fail|skip>"),
    (("synthetic_dce", "--config=huge"), "unknown config 'huge'; available: small, medium, tiny, paper"),
    (("synthetic_dce", "--num_shards=0"), "--num_shards=0"),
    (("synthetic_dce", "extra"), "expected one builder name, got 2"),
])
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, args, expected):
  result = run_cli(*args, f"--data_dir={tmp_path}")
  assert result.returncode == 2
  assert expected in one_line(result.stderr)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif("breast_mri_nact_pilot" not in build_lib.available_builders(),
                    reason="breast_mri_nact_pilot builder not in this checkout")
def test_missing_manual_dir_is_one_line_exit_1_and_leaves_nothing(tmp_path):
  data_dir = tmp_path / "data"
  result = run_cli("breast_mri_nact_pilot", f"--data_dir={data_dir}", f"--manual_dir={tmp_path / 'empty'}")
  assert result.returncode == 1
  line = one_line(result.stderr)
  assert line.startswith("build: error: ") and "manual_dir" in line and "--manual_dir" in line
  assert not data_dir.exists() or list(data_dir.rglob("*")) == []


def test_library_rejects_bad_arguments(tmp_path):
  with pytest.raises(build_lib.BuildError, match="unknown builder '../etc'"):
    build_lib.build("../etc", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="on_bad_case must be 'fail' or 'skip', got 'never'"):
    build_lib.build("synthetic_dce", data_dir=str(tmp_path), on_bad_case="never")
  assert set(build_lib.available_builders()) >= {"synthetic_dce"}
