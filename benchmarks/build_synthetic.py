"""Synthetic collection: build throughput (exams/s) and how hard the phantom is.

Times the whole `build` of a config (generation, validation, encoding, writing)
into a temporary data_dir, the generation of one exam on the paper's grid, and
the best Dice that one threshold on the normalised early residual reaches.

  python -m benchmarks.build_synthetic [--config=small] [--paper_exams=1]
"""
import tempfile
import time

from absl import app, flags

from tfds_builders import build as build_lib
from tfds_builders.synthetic_dce import Builder, difficulty, phantom

_CONFIG = flags.DEFINE_string("config", "small", "synthetic_dce config to build and time")
_PAPER_EXAMS = flags.DEFINE_integer("paper_exams", 1, "exams of the `paper` config to generate and time")


def main(argv):
  del argv
  config = Builder.builder_configs[_CONFIG.value]
  with tempfile.TemporaryDirectory() as data_dir:
    summary = build_lib.build("synthetic_dce", data_dir=data_dir, config=config.name, progress=False)
  print(f"build {config.name} ({config.num_cases} exams of {'x'.join(map(str, config.shape))}): "
        f"{summary.seconds:.2f} s, {summary.cases_written / summary.seconds:.1f} exams/s, "
        f"{summary.num_shards} shard(s), {summary.num_bytes / 2**20:.1f} MiB")

  start = time.perf_counter()
  cases = [phantom.make_case(i, config) for i in range(config.num_cases)]
  seconds = time.perf_counter() - start
  print(f"generate {config.name}: {config.num_cases / seconds:.1f} exams/s (phantom only)")
  scores = difficulty.residual_threshold_dice(cases)
  print(f"one threshold on the normalised residual (post 1 - pre), {config.name}: "
        f"pooled Dice {scores['pooled_dice']:.3f}, best-per-case (oracle) Dice {scores['oracle_per_case_dice']:.3f}")

  paper = Builder.builder_configs["paper"]
  start = time.perf_counter()
  for i in range(_PAPER_EXAMS.value):
    phantom.make_case(i, paper)
  seconds = time.perf_counter() - start
  print(f"generate paper ({'x'.join(map(str, paper.shape))}): {seconds / _PAPER_EXAMS.value:.2f} s/exam, "
        f"{_PAPER_EXAMS.value / seconds:.2f} exams/s (phantom only)")


if __name__ == "__main__":
  app.run(main)
