"""Cases → normalised three-channel slabs → batches → global device arrays.

Records (one whole DCE exam each, DESIGN.md §2) are read by random access
(`tfds.data_source` or any sequence of record dicts). Per case, the
pre-contrast phase and `data.post_phase` are normalised with the same
statistics and stacked with their residual post - pre as three channels;
training draws slabs of `data.slab` consecutive slices from them.

Randomness: Grain shuffles the record indices per epoch and hands every element
a generator seeded by (seed, global element position), so batches depend only
on the seed and the step, never on threads, workers or restarts.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Iterable, Iterator, Sequence

from absl import flags
import grain
import jax
import numpy as np

from tfds_builders.records import CaseError

NORMALIZATIONS = ("pre_body", "pooled", "per_phase")


class DataError(ValueError):
  """A dataset or pipeline setting that cannot be used; the message says why."""


# -- normalisation -------------------------------------------------------------------

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold: the histogram cut maximising the between-class variance."""
  values = np.asarray(values, np.float64).ravel()
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return lo
  hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
  centers = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(hist, dtype=np.float64)
  w1 = w0[-1] - w0
  s0 = np.cumsum(hist * centers)
  with np.errstate(divide="ignore", invalid="ignore"):
    m0 = s0 / w0
    m1 = (s0[-1] - s0) / w1
    between = w0 * w1 * (m0 - m1) ** 2
  between[~np.isfinite(between)] = -1.0
  # Bins 0..i form the lower class, so the cut is bin i's upper edge; on a plateau
  # (an empty gap between the modes) take its middle rather than its first bin.
  best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
  return float(edges[best[len(best) // 2] + 1])


def body_mask(pre: np.ndarray) -> np.ndarray:
  """Voxels of the pre-contrast phase above its Otsu threshold (the body, not air)."""
  body = pre > otsu_threshold(pre)
  return body if body.any() else np.ones_like(body)


def _zscore_stats(values: np.ndarray, what: str, case_id: str) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  mean, std = float(values.mean()), float(values.std())
  if not std > 1e-6 * max(1.0, abs(mean)):
    raise CaseError(f"{case_id}: {what} is constant ({mean:g}); cannot z-score it")
  return mean, std


def normalize_case(image: np.ndarray, *, post_phase: int = 1, method: str = "pre_body",
                   case_id: str = "case") -> np.ndarray:
  """[T, S, H, W] scanner intensities → [S, H, W, 3] float32 (pre, post, post - pre).

  `pre_body` (default) z-scores both phases by the pre-contrast mean/std inside
  the body so that the residual still measures enhancement ((post - pre) / std);
  `pooled` uses the mean/std of all voxels of all phases (MAMA-MIA's baseline);
  `per_phase` z-scores pre and post separately (nnU-Net), which removes the
  enhancement that the residual is meant to show.
  """
  image = np.asarray(image)
  if image.ndim != 4:
    raise CaseError(f"{case_id}: image has shape {image.shape}, expected [T, S, H, W]")
  num_phases = image.shape[0]
  if not 1 <= post_phase < num_phases:
    raise CaseError(
        f"{case_id}: post_phase {post_phase} requested but the case has {num_phases} phases "
        f"(0 = pre-contrast, 1..{num_phases - 1} post-contrast)")
  pre = image[0].astype(np.float32)
  post = image[post_phase].astype(np.float32)
  if method == "pre_body":
    mean, std = _zscore_stats(pre[body_mask(pre)], "the pre-contrast phase inside the body", case_id)
    pre_n, post_n = (pre - mean) / std, (post - mean) / std
  elif method == "pooled":
    mean, std = _zscore_stats(image, "the image over all phases", case_id)
    pre_n, post_n = (pre - mean) / std, (post - mean) / std
  elif method == "per_phase":
    m0, s0 = _zscore_stats(pre, "the pre-contrast phase", case_id)
    m1, s1 = _zscore_stats(post, f"phase {post_phase}", case_id)
    pre_n, post_n = (pre - m0) / s0, (post - m1) / s1
  else:
    raise DataError(f"unknown normalization {method!r}; expected one of {', '.join(NORMALIZATIONS)}")
  return np.stack([pre_n, post_n, post_n - pre_n], axis=-1).astype(np.float32)


# -- records ---------------------------------------------------------------------------

def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode() if isinstance(value, bytes) else str(value)


def _cfg(data_cfg, name: str, default):
  value = data_cfg.get(name, default) if hasattr(data_cfg, "get") else getattr(data_cfg, name, default)
  return default if value is None else value


def open_source(data_cfg, data_dir=None) -> tuple[Any, list[dict]]:
  """The built collection's "train" split as a random-access source, and its case table.

  `data_dir` (default `data_cfg.data_dir`) is where `tfds_builders.build` wrote
  the collection. The case table (`info.metadata["cases"]`) lists case_id,
  patient_id, strata, collection, num_phases and tumor_voxels in record order,
  so splits and index lookups never decode an image.
  """
  from tfds_builders import build  # pylint: disable=g-import-not-at-top  (imports TFDS)
  data_dir = data_dir or data_cfg.data_dir or None
  config = data_cfg.builder_config or None
  try:
    builder = build.make_builder(data_cfg.builder, data_dir=data_dir, config=config)
  except build.BuildError as e:
    raise DataError(str(e)) from None
  name = f"{builder.name}/{builder.builder_config.name}"
  if not builder.is_prepared():
    raise DataError(
        f"{name}: no built dataset in {builder.data_dir}; build it with `python -m "
        f"tfds_builders.build {builder.name} --config={builder.builder_config.name} "
        f"--data_dir={builder.data_dir_root}`")
  cases = list(builder.info.metadata.get("cases", []))
  source = builder.as_data_source(split="train")
  if len(cases) != len(source):
    raise DataError(f"{name}: case table lists {len(cases)} cases but the split has {len(source)} records")
  return source, cases


def record_indices(cases: Sequence[dict], case_ids: Iterable[str]) -> list[int]:
  """Record indices of `case_ids` in the case table (for `train_dataset` / `load_case`)."""
  position = {str(c["case_id"]): i for i, c in enumerate(cases)}
  case_ids = list(case_ids)
  unknown = [cid for cid in case_ids if cid not in position]
  if unknown:
    raise DataError(f"case ids not in the dataset: {', '.join(unknown[:5])}"
                    f"{' ...' if len(unknown) > 5 else ''} (splits made from another dataset?)")
  return [position[cid] for cid in case_ids]


def load_case(source, index: int, data_cfg) -> dict[str, Any]:
  """One whole normalised case, for whole-volume evaluation and inference.

  Returns image [S, H, W, 3] float32, mask [S, H, W] uint8, spacing (z, y, x) mm,
  case_id, patient_id, and the record's geometry entries when present.
  """
  record = source[int(index)]
  case_id = _text(record.get("case_id", f"record {index}"))
  out = {
      "image": normalize_case(record["image"], post_phase=int(data_cfg.post_phase),
                              method=data_cfg.normalization, case_id=case_id),
      "mask": np.asarray(record["mask"], np.uint8),
      "spacing": np.asarray(record["spacing"], np.float32),
      "case_id": case_id,
      "patient_id": _text(record.get("patient_id", "")),
  }
  for key in ("source_geometry", "grid_geometry", "phase_times"):
    if key in record:
      out[key] = record[key]
  return out


# -- slabs -----------------------------------------------------------------------------

class _CaseCache:
  """Normalised cases by record index, least recently used evicted past a byte budget.

  Normalisation is deterministic, so caching changes speed, never results. Each
  worker process holds its own cache (memory = budget x workers).
  """

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes
    self._items: collections.OrderedDict[int, tuple] = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()

  def get(self, index: int):
    with self._lock:
      item = self._items.get(index)
      if item is not None:
        self._items.move_to_end(index)
      return item

  def put(self, index: int, item: tuple) -> None:
    size = sum(a.nbytes for a in item if isinstance(a, np.ndarray))
    if size > self.max_bytes:
      return
    with self._lock:
      if index in self._items:
        return
      self._items[index] = item
      self._bytes += size
      while self._bytes > self.max_bytes:
        _, old = self._items.popitem(last=False)
        self._bytes -= sum(a.nbytes for a in old if isinstance(a, np.ndarray))


class SlabSampler:
  """Grain random map: record index → one slab {"image": [s,H,W,3], "mask": [s,H,W]}.

  With probability `foreground_fraction` the slab is placed over a tumor slice
  drawn in proportion to its tumor voxels (nnU-Net's foreground oversampling:
  a random foreground voxel, then a window containing it); otherwise, and for
  cases without tumor, the start is uniform.
  """

  def __init__(self, source, data_cfg):
    self.source = source
    self.slab = int(data_cfg.slab)
    self.post_phase = int(data_cfg.post_phase)
    self.method = str(data_cfg.normalization)
    self.foreground_fraction = float(data_cfg.foreground_fraction)
    self.cache_bytes = int(float(_cfg(data_cfg, "cache_mb", 1024)) * 2**20)
    if self.slab < 1:
      raise DataError(f"data.slab must be >= 1, got {self.slab}")
    if not 0.0 <= self.foreground_fraction <= 1.0:
      raise DataError(f"data.foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
    if self.method not in NORMALIZATIONS:
      raise DataError(f"unknown data.normalization {self.method!r}; expected one of {', '.join(NORMALIZATIONS)}")
    self._cache = _CaseCache(self.cache_bytes)

  def __getstate__(self):  # worker processes start with an empty cache
    state = dict(self.__dict__)
    del state["_cache"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache = _CaseCache(self.cache_bytes)

  def case(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised image, mask, tumor voxels per slice) of one record."""
    item = self._cache.get(index)
    if item is None:
      record = self.source[index]
      case_id = _text(record.get("case_id", f"record {index}"))
      image = normalize_case(record["image"], post_phase=self.post_phase, method=self.method,
                             case_id=case_id)
      mask = np.asarray(record["mask"], np.uint8)
      if image.shape[0] < self.slab:
        raise CaseError(f"{case_id}: {image.shape[0]} slices, fewer than data.slab={self.slab}")
      item = (image, mask, mask.reshape(mask.shape[0], -1).sum(1, dtype=np.int64))
      self._cache.put(index, item)
    return item

  def slab_start(self, tumor_per_slice: np.ndarray, rng: np.random.Generator) -> int:
    num_slices = tumor_per_slice.shape[0]
    total = int(tumor_per_slice.sum())
    # Both draws are always made so that one element's stream never depends on the case.
    want_tumor = rng.random() < self.foreground_fraction
    u = rng.random()
    if want_tumor and total > 0:
      voxel = int(u * total)
      z = int(np.searchsorted(np.cumsum(tumor_per_slice), voxel, side="right"))
      lo, hi = max(0, z - self.slab + 1), min(z, num_slices - self.slab)
      return int(rng.integers(lo, hi + 1))
    return int(rng.integers(0, num_slices - self.slab + 1))

  def __call__(self, index, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, mask, tumor_per_slice = self.case(int(index))
    z0 = self.slab_start(tumor_per_slice, rng)
    return {"image": image[z0:z0 + self.slab],
            "mask": mask[z0:z0 + self.slab].astype(np.float32)}


def train_dataset(source, indices: Sequence[int], data_cfg, *, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Infinite, seeded stream of this process's share of each global batch.

  The global stream is defined once (shuffle per epoch → slab per element →
  global batches of `batch_size`); process `shard_index` of `shard_count` takes
  the contiguous rows [i*b, (i+1)*b) of every global batch, b = batch_size //
  shard_count, and only computes those. Hence the processes' batches are
  disjoint and, concatenated in process order, equal the one-process batch.

  Yields {"image": [b, slab, H, W, 3] float32, "mask": [b, slab, H, W] float32}.
  Its iterator's get_state()/set_state() (a small JSON-able dict) resume exactly.
  """
  indices = [int(i) for i in indices]
  if not indices:
    raise DataError("train_dataset: no training cases")
  if not 0 <= min(indices) <= max(indices) < len(source):
    raise DataError(f"train_dataset: record indices must be in [0, {len(source)}), "
                    f"got {min(indices)}..{max(indices)}")
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index {shard_index} out of range for shard_count {shard_count}")
  if batch_size < 1 or batch_size % shard_count:
    raise DataError(f"global batch size {batch_size} is not a positive multiple of the "
                    f"{shard_count} processes")
  per_process = batch_size // shard_count

  ds = grain.MapDataset.source(indices).seed(seed).shuffle().repeat()
  ds = ds.random_map(SlabSampler(source, data_cfg))
  ds = ds.batch(per_process, drop_remainder=True)
  ds = ds[shard_index::shard_count]
  read_options = grain.ReadOptions(
      num_threads=int(_cfg(data_cfg, "read_threads", 2)),
      prefetch_buffer_size=int(_cfg(data_cfg, "prefetch_batches", 4)))
  out = ds.to_iter_dataset(read_options)
  workers = int(_cfg(data_cfg, "worker_count", 0))
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's workers read its absl flags; outside an absl app (tests, notebooks)
      # they would be unparsed and the workers would fail. Defaults are right here.
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return out


# -- device ----------------------------------------------------------------------------

def device_batches(iterator: Iterable[dict], sharding: jax.sharding.Sharding) -> Iterator[dict]:
  """Host batches → global jax.Arrays laid out by `sharding` (batch axis over "data").

  Each process passes its own share; `jax.make_array_from_process_local_data`
  assembles the global batch. Batches are pulled one at a time, only when asked
  for, so the Grain iterator's state always matches the batches consumed.
  """
  for batch in iterator:
    yield jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
