"""Builds one collection into sharded array_record files, without TensorFlow.

  python -m tfds_builders.build <name> [--data_dir=] [--manual_dir=] [--config=]
      [--on_bad_case=fail|skip] [--num_shards=]

`tfds build` needs TensorFlow; this command drives the same
`download_and_prepare` with a progress bar over cases and prints a summary.
Builders are found by name as `tfds_builders.<name>.<name>_dataset_builder.Builder`.
Exit status: 0 built or reused, 1 the data could not be built (bad case, missing
manual download), 2 bad command line (flags, builder or config name).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Sequence

import tensorflow_datasets as tfds
import tqdm
from absl import app, flags, logging

from tfds_builders import base
from tfds_builders.records import CaseError

DEFAULT_DATA_DIR = "~/tensorflow_datasets"
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


class BuildError(ValueError):
  """The command names a builder or config that does not exist."""


@dataclasses.dataclass
class BuildSummary:
  """What a build left on disk."""
  name: str
  config: str
  version: str
  path: str                          # the dataset's version folder
  cases_written: int
  skipped: list[tuple[str, str]]     # (case_id, reason)
  num_shards: int
  num_bytes: int                     # on disk: every file in the version folder
  record_bytes: int                  # serialized records, as TFDS counts them
  reused: bool                       # already built; nothing was generated
  seconds: float

  def format(self) -> str:
    head = "reused existing dataset" if self.reused else f"built in {self.seconds:.1f} s"
    lines = [f"{self.name}/{self.config}:{self.version} {head} at {self.path}",
             f"  cases written: {self.cases_written}",
             f"  cases skipped: {len(self.skipped)}"]
    lines += [f"    {case_id}: {reason}" for case_id, reason in self.skipped]
    lines += [f"  shards: {self.num_shards}",
              f"  bytes: {self.num_bytes:,} on disk ({self.record_bytes:,} of serialized records)"]
    return "\n".join(lines)


def available_builders() -> list[str]:
  """Names of the collections under tfds_builders/ (folders holding <name>_dataset_builder.py)."""
  return sorted(p.parent.name for p in _PACKAGE_DIR.glob("*/*_dataset_builder.py")
                if p.stem == f"{p.parent.name}_dataset_builder")


def builder_class(name: str) -> type[base.CollectionBuilder]:
  """The builder class of collection `name`; BuildError if there is none."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name not in available_builders():
    raise BuildError(f"unknown builder {name!r}; available: {', '.join(available_builders())}")
  module = importlib.import_module(f"tfds_builders.{name}.{name}_dataset_builder")
  cls = getattr(module, "Builder", None)
  if not (isinstance(cls, type) and issubclass(cls, base.CollectionBuilder)):
    raise BuildError(f"tfds_builders/{name}/{name}_dataset_builder.py defines no CollectionBuilder named Builder")
  return cls


def make_builder(name: str, *, data_dir: str | None = None, config: str | None = None,
                 on_bad_case: str = "fail") -> base.CollectionBuilder:
  """An instance of the named builder and config (default config when None)."""
  cls = builder_class(name)
  if config is not None and config not in cls.builder_configs:
    raise BuildError(f"{name}: unknown config {config!r}; available: {', '.join(cls.builder_configs)}")
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  return cls(data_dir=data_dir, config=config, on_bad_case=on_bad_case)


def _summary(builder: base.CollectionBuilder, reused: bool, seconds: float, skipped) -> BuildSummary:
  split = builder.info.splits["train"]
  return BuildSummary(
      name=builder.name, config=builder.builder_config.name, version=str(builder.version),
      path=os.fspath(builder.data_path), cases_written=int(split.num_examples),
      skipped=[tuple(s) for s in skipped], num_shards=int(split.num_shards),
      num_bytes=sum(p.stat().st_size for p in pathlib.Path(builder.data_path).iterdir() if p.is_file()),
      record_bytes=int(split.num_bytes), reused=reused, seconds=seconds)


@contextlib.contextmanager
def _case_progress(builder: base.CollectionBuilder, enabled: bool):
  """A tqdm bar over the builder's cases (written or skipped), replacing TFDS's own bars."""
  bars = []
  list_refs, load_case = builder._case_refs, builder._load_case   # the subclass hooks

  def counted_refs(dl_manager):
    refs = list_refs(dl_manager)
    bars.append(tqdm.tqdm(total=len(refs), unit="case", disable=not enabled, file=sys.stderr,
                          desc=f"{builder.name}/{builder.builder_config.name}"))
    return refs

  def counted_load(ref):
    try:
      return load_case(ref)
    finally:
      bars[-1].update(1)

  builder._case_refs, builder._load_case = counted_refs, counted_load
  was_active = tfds.core.utils.tqdm_utils._active
  tfds.core.utils.tqdm_utils.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.core.utils.tqdm_utils.display_progress_bar(was_active)
    for bar in bars:
      bar.close()
    del builder._case_refs, builder._load_case


def _remove_if_new(paths_before: dict[pathlib.Path, bool], only_empty: bool) -> None:
  """Removes the folders this build created (only those left empty when `only_empty`)."""
  for path, existed in paths_before.items():          # deepest first
    if existed or not path.exists():
      continue
    if only_empty:
      if all(p.is_dir() for p in path.rglob("*")):
        shutil.rmtree(path)
    else:
      shutil.rmtree(path)


def build(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
          config: str | None = None, on_bad_case: str = "fail", num_shards: int | None = None,
          progress: bool = True) -> BuildSummary:
  """Builds (or reuses) collection `name`; returns what was written.

  Raises BuildError (unknown builder/config), ValueError (bad on_bad_case),
  base.ManualDirError (missing download) or records.CaseError (a bad case with
  on_bad_case="fail"). A failed build leaves nothing that looks complete: TFDS
  writes into an `incomplete.*` folder that it removes, and the folders this
  build created are removed too.
  """
  if on_bad_case not in ("fail", "skip"):
    raise ValueError(f"on_bad_case must be 'fail' or 'skip', got {on_bad_case!r}")
  if num_shards is not None and num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  builder = make_builder(name, data_dir=data_dir, config=config, on_bad_case=on_bad_case)
  if builder.is_prepared():
    return _summary(builder, True, 0.0, builder.info.metadata.get("skipped", []))
  root = pathlib.Path(builder.data_dir_root)
  config_dir = pathlib.Path(builder.data_path).parent
  created = {p: p.exists() for p in (config_dir, config_dir.parent, root / "downloads")}
  root_existed = root.exists()
  dl_config = tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir) if manual_dir else None, num_shards=num_shards)
  start = time.perf_counter()
  try:
    with _case_progress(builder, progress):
      builder.download_and_prepare(download_config=dl_config)
  except BaseException:
    if pathlib.Path(builder.data_path).exists() and not builder.is_prepared():
      shutil.rmtree(builder.data_path)
    _remove_if_new(created, only_empty=False)
    if not root_existed and root.is_dir() and not any(root.iterdir()):
      root.rmdir()
    raise
  _remove_if_new({root / "downloads": created[root / "downloads"]}, only_empty=True)
  return _summary(builder, False, time.perf_counter() - start, builder.skipped)


# --- command line ------------------------------------------------------------------
FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Flags exist only when this module is the program: importers (training) define their own."""
  flags.DEFINE_string("data_dir", None, f"Where datasets are written (default {DEFAULT_DATA_DIR}).")
  flags.DEFINE_string("manual_dir", None, "Folder of a manual download (collections that need one).")
  flags.DEFINE_string("config", None, "Builder config name (default: the builder's first config).")
  flags.DEFINE_enum("on_bad_case", "fail", ["fail", "skip"], "Stop at a bad case, or skip and list it.")
  flags.DEFINE_integer("num_shards", None, "Number of shards (default: TFDS's choice by size).",
                       lower_bound=1)

def _fail(message: str, code: int):
  print(f"build: error: {message}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing that reports a bad flag in one line and exits 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0], 2)


def main(argv: Sequence[str]) -> None:
  logging.set_verbosity(logging.ERROR)   # TFDS's INFO/WARNING chatter; the summary says what matters
  if len(argv) != 2:
    _fail(f"expected one builder name, got {len(argv) - 1}; "
          f"usage: python -m tfds_builders.build <name> (one of {', '.join(available_builders())})", 2)
  try:
    summary = build(argv[1], data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, config=FLAGS.config,
                    on_bad_case=FLAGS.on_bad_case, num_shards=FLAGS.num_shards)
  except BuildError as e:
    _fail(str(e), 2)
  except (CaseError, base.ManualDirError) as e:
    _fail(str(e).splitlines()[0], 1)
  print(summary.format())


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
