"""What every collection builder shares: record spec, validation, bad-case policy.

A subclass lists its cases (`_case_refs`) and loads one (`_load_case`); this base
validates each case with `records.check_case`, applies the `on_bad_case` policy
(fail on the first bad case, or skip it and list it with its reason), and keeps
the record order equal to the generation order so that `info.metadata["cases"]`
indexes the records without decoding any image.
"""
from __future__ import annotations

import dataclasses
import inspect
import pathlib
from typing import Any, Iterator

import tensorflow_datasets as tfds

from tfds_builders import records
from tfds_builders.records import CaseError


class ManualDirError(FileNotFoundError):
  """The collection's manual download is missing; the message says what to do."""


class CaseSkipped(CaseError):
  """A case the collection itself excludes (e.g. a study its series key marks excluded).

  Always listed in `skipped` with its reason, never a build failure, whatever `on_bad_case` says.
  """


@dataclasses.dataclass(eq=False)
class GridConfig(tfds.core.BuilderConfig):
  """A builder config fixing the stored grid (slices, rows, columns)."""
  shape: tuple[int, int, int] = (60, 256, 256)


class CollectionBuilder(tfds.core.GeneratorBasedBuilder):
  """Base class of all collection builders. Subclasses set the class attributes."""

  COLLECTION = ""          # human name, used in messages
  DOWNLOAD = ""            # where a user gets the data
  EXPECTED_LAYOUT = ""     # one line describing manual_dir's layout
  HOMEPAGE = ""
  CITATION = ""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # Each collection's folder carries its CITATIONS.bib; TFDS shows it in the dataset info.
    bib = pathlib.Path(inspect.getfile(cls)).with_name("CITATIONS.bib")
    if not cls.CITATION and bib.exists():
      cls.CITATION = bib.read_text()

  def __init__(self, *, on_bad_case: str = "fail", **kwargs):
    if on_bad_case not in ("fail", "skip"):
      raise ValueError(f"on_bad_case must be 'fail' or 'skip', got {on_bad_case!r}")
    self.on_bad_case = on_bad_case
    self.skipped: list[tuple[str, str]] = []
    self._case_table: list[dict[str, Any]] = []
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # -- to implement -------------------------------------------------------------
  def _case_refs(self, dl_manager) -> list[tuple[str, Any]]:
    """(case_id, reference) for every case, in a deterministic order."""
    raise NotImplementedError

  def _load_case(self, ref: Any) -> dict[str, Any]:
    """The record dict of one case; raises CaseError naming case and problem."""
    raise NotImplementedError

  # -- shared ---------------------------------------------------------------------
  @property
  def grid_shape(self) -> tuple[int, int, int]:
    return tuple(self.builder_config.shape)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=records.features(*self.grid_shape),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def manual_path(self, dl_manager) -> pathlib.Path:
    """The manual download folder, or a ManualDirError saying where to get it."""
    try:
      path = pathlib.Path(dl_manager.manual_dir)
    except (AssertionError, ValueError, FileNotFoundError) as e:  # tfds raises on missing dirs
      path = None
      detail = str(e).splitlines()[0] if str(e) else "not given"
    else:
      detail = f"{path} is missing or empty"
      if path.is_dir() and any(path.iterdir()):
        return path
    raise ManualDirError(
        f"{self.COLLECTION}: manual_dir {detail}; expected layout: {self.EXPECTED_LAYOUT}; "
        f"download it from {self.DOWNLOAD} and pass --manual_dir=<folder>")

  def _split_generators(self, dl_manager):
    refs = self._case_refs(dl_manager)
    return {"train": self._generate_examples(refs)}

  def _generate_examples(self, refs) -> Iterator[tuple[str, dict[str, Any]]]:
    self._case_table.clear()
    self.skipped.clear()
    for index, (case_id, ref) in enumerate(refs):
      try:
        case = records.check_case(self._load_case(ref), self.grid_shape)
      except CaseError as e:
        if self.on_bad_case == "fail" and not isinstance(e, CaseSkipped):
          raise
        self.skipped.append((case_id, str(e)))
        continue
      self._case_table.append({
          "case_id": case["case_id"], "patient_id": case["patient_id"],
          "strata": int(case["strata"]), "collection": case["collection"],
          "num_phases": int(case["image"].shape[0]),
          "tumor_voxels": int(case["mask"].sum()),
      })
      # Zero-padded keys keep the generation order (disable_shuffling sorts by key).
      yield f"{index:06d}", case

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    # Written into dataset_info.json with the records: the case table in record order.
    self.info.metadata["cases"] = list(self._case_table)
    self.info.metadata["skipped"] = [list(s) for s in self.skipped]
