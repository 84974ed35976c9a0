"""The external breast DCE-MRI test set used by the paper (Zenodo 8068383), one record per case.

The archive's exact folder and file names could not be confirmed, so the layout is a
builder config: where a case's phases are (`case_dir` and `phase_file` templates with
{centre}, {case}, {phase}) and where its mask is (`mask_file`). Cases are found by the
`case_dir` template; a case's phases are P0 (pre-contrast), P1, ... up to the first
missing number. Names are matched case-insensitively. When nothing matches, the message
lists the templates and what the folder holds.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import tensorflow_datasets as tfds

from tfds_builders import reader
from tfds_builders.base import CollectionBuilder, GridConfig, ManualDirError
from tfds_builders.records import CaseError


@dataclasses.dataclass(eq=False)
class LayoutConfig(GridConfig):
  """Grid and archive layout; templates are relative to manual_dir, '/'-separated."""
  case_dir: str = "{centre}/{case}"
  phase_file: str = "P{phase}.nii.gz"
  mask_file: str = "{centre}_gt/{case}.nii.gz"
  max_phases: int = 6      # P0..P5

  def describe(self) -> str:
    return (f"phases <manual_dir>/{self.case_dir}/{self.phase_file} (phase 0 = pre-contrast), "
            f"masks <manual_dir>/{self.mask_file}")


@dataclasses.dataclass
class Case:
  case_id: str
  centre: str
  name: str
  folder: pathlib.Path
  root: pathlib.Path


class Builder(CollectionBuilder):
  """DatasetBuilder for the external test set (Zenodo 8068383, manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Phases P0..P5 per case, per-centre masks, layout given by the config."}
  BUILDER_CONFIGS = [LayoutConfig(name="default", shape=(60, 256, 256),
                                  description="The paper's grid; <centre>/<case>/P<p>.nii.gz, <centre>_gt/<case>.nii.gz.")]
  COLLECTION = "Zhang external breast DCE-MRI set"
  DOWNLOAD = "https://doi.org/10.5281/zenodo.8068383"
  HOMEPAGE = "https://doi.org/10.5281/zenodo.8068383"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download and unpack the archive from " + DOWNLOAD + " and pass the unpacked folder as manual_dir.")

  @property
  def EXPECTED_LAYOUT(self) -> str:  # noqa: N802 -- the base class reads it as an attribute
    return self.builder_config.describe()

  def _case_refs(self, dl_manager) -> list[tuple[str, Case]]:
    root = self.manual_path(dl_manager)
    layout = self.builder_config
    cases = find_cases(root, layout)
    if not cases:
      found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())[:8]
      raise ManualDirError(f"{self.COLLECTION}: no case folders {layout.case_dir} holding "
                           f"{layout.phase_file.format(phase=0)} below {root}; expected {layout.describe()}; "
                           f"found folders {found}; download it from {self.DOWNLOAD}")
    return [(c.case_id, c) for c in cases]

  def _load_case(self, case: Case) -> dict[str, Any]:
    return load_case(case, self.builder_config, self.grid_shape, self._centres)

  def _split_generators(self, dl_manager):
    refs = self._case_refs(dl_manager)
    self._centres = sorted({c.centre for _, c in refs})
    return {"train": self._generate_examples(refs)}


def _template_regex(template: str) -> re.Pattern:
  parts = re.split(r"(\{centre\}|\{case\})", template.strip("/"))
  pattern = "".join("(?P<centre>[^/]+)" if p == "{centre}" else "(?P<case>[^/]+)" if p == "{case}"
                    else re.escape(p) for p in parts)
  return re.compile(f"^{pattern}$", re.IGNORECASE)


def find_cases(root: pathlib.Path, layout: LayoutConfig) -> list[Case]:
  """Folders matching `case_dir` that hold the phase-0 file, sorted by (centre, case)."""
  regex = _template_regex(layout.case_dir)
  depth = layout.case_dir.strip("/").count("/") + 1
  cases = []
  for folder in sorted(root.glob("/".join(["*"] * depth))):
    rel = folder.relative_to(root).as_posix()
    m = regex.match(rel)
    if not folder.is_dir() or not m:
      continue
    centre = m.groupdict().get("centre") or ""
    if centre.lower().endswith("_gt"):
      continue
    name = m["case"]
    if reader.find_child(folder, layout.phase_file.format(phase=0, centre=centre, case=name), name) is None:
      continue
    cases.append(Case(f"{centre}_{name}" if centre else name, centre, name, folder, root))
  return sorted(cases, key=lambda c: (c.centre, c.name))


def load_case(case: Case, layout: LayoutConfig, shape, centres: list[str]) -> dict[str, Any]:
  """The record of one case: P0.. in order, the centre's mask; times unknown (-1)."""
  cid = case.case_id
  name = lambda p: layout.phase_file.format(phase=p, centre=case.centre, case=case.name)
  found = {p: reader.find_child(case.folder, name(p), cid) for p in range(layout.max_phases)}
  present = [p for p, path in found.items() if path is not None]
  missing = [p for p in range(max(present) + 1) if found[p] is None]
  if missing:
    raise CaseError(f"{cid}: phase file(s) {', '.join(name(p) for p in missing)} missing in {case.folder} "
                    f"(found {', '.join(found[p].name for p in present)})")
  files = [found[p] for p in present]
  mask_rel = layout.mask_file.format(centre=case.centre, case=case.name)
  mask_path = case.root
  for part in mask_rel.split("/"):
    mask_path = reader.find_child(mask_path, part, cid) if mask_path is not None else None
  if mask_path is None:
    raise CaseError(f"{cid}: mask {mask_rel} not found below {case.root} (expected {layout.describe()})")
  phases = [reader.read_image(p) for p in files]
  mask = reader.read_image(mask_path, is_mask=True)
  return reader.make_record(phases, mask, shape, case_id=cid, patient_id=cid, phase_times=[-1.0] * len(files),
                            strata=centres.index(case.centre), collection=case.centre)
