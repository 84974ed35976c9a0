"""Input-pipeline throughput (slabs/s) on the synthetic collection.

Builds the collection config (default `small`) into a temporary data_dir with
`tfds_builders.build`, then times `input_pipeline.train_dataset` over all its
records, for each worker count, in two regimes:
  - cold: the case cache disabled (`data.cache_mb=0`), so every slab decodes and
    normalises its whole case (the cost when cases do not fit in memory);
  - warm: every case already cached, so a slab is a crop (the steady state when
    the collection fits in the cache).
Restrict the cores with e.g. `taskset -c 0,1` to measure the 2-core figure.

  python -m benchmarks.pipeline_throughput [--config=small] [--workers=0,2] [--seconds=10]
"""
import os
import tempfile
import time

from absl import app, flags, logging

from configs import base as base_config
from rst2g_jax import input_pipeline
from tfds_builders import build

_CONFIG = flags.DEFINE_string("config", "small", "synthetic_dce builder config")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "data.worker_count values to time")
_BATCH = flags.DEFINE_integer("batch_size", 4, "slabs per batch")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "timed seconds per setting (after warm-up)")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "reuse a built dataset here instead of a temp dir")


def _slabs_per_second(source, data_cfg, batch_size: int, seconds: float, warmup: int) -> float:
  it = iter(input_pipeline.train_dataset(source, range(len(source)), data_cfg,
                                         batch_size=batch_size, seed=0))
  try:
    for _ in range(warmup):
      next(it)
    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
      next(it)
      batches += 1
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    it.close()


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)   # TFDS's build chatter
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = _DATA_DIR.value or tmp
    summary = build.build("synthetic_dce", data_dir=data_dir, config=_CONFIG.value, progress=False)
    print(summary.format())
    data_cfg = base_config.get_config().data
    data_cfg.builder_config = _CONFIG.value
    source, cases = input_pipeline.open_source(data_cfg, data_dir)
    shape = source[0]["image"].shape
    print(f"{len(cases)} cases of [T,S,H,W]={list(shape)}; slab {data_cfg.slab}, batch {_BATCH.value}, "
          f"normalization {data_cfg.normalization}, {cores} cores")
    batches_per_epoch = -(-len(source) // _BATCH.value)
    for workers in map(int, _WORKERS.value):
      for regime, cache_mb in (("cold", 0), ("warm", 4096)):
        data_cfg.worker_count = workers
        data_cfg.cache_mb = cache_mb
        # Warm-up: one batch (cold) or two epochs, so that each worker's cache is full (warm).
        warmup = 1 if regime == "cold" else 2 * batches_per_epoch * max(1, workers)
        rate = _slabs_per_second(source, data_cfg, _BATCH.value, _SECONDS.value, warmup)
        print(f"workers={workers} {regime}: {rate:8.1f} slabs/s")


if __name__ == "__main__":
  app.run(main)
