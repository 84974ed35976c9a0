"""Patient-level, stratified test/fold splits (DESIGN.md §3), stored as JSON.

A patient may have several exams (NACT visits); all of them land in the same
part so that no patient is both trained on and scored. A patient's stratum is
that of its first exam in the case table (the baseline visit for NACT).

Counts are apportioned per stratum by controlled rounding: part p receives
floor or ceil of `n_s * share_p` patients of stratum s (share = test_fraction
for the test part, (1 - test_fraction) / num_folds for each fold), and the
parts that get the extra patient are those furthest below their running
target, so whole-part sizes stay balanced too. With one exam per patient the
strata proportions of every part are therefore within one case of exact.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

_KEYS = ("seed", "test_fraction", "num_folds", "test", "folds", "strata")


class SplitsError(ValueError):
  """Splits that cannot be made or a splits file that cannot be read."""


def _apportion(n: int, shares: np.ndarray, deficit: np.ndarray) -> np.ndarray:
  """Integer counts summing to n, each floor or ceil of n*share.

  The remaining units go to the parts with the largest running `deficit`
  (target so far minus count so far), which keeps part totals near their
  targets across strata.
  """
  exact = n * shares
  counts = np.floor(exact + 1e-9).astype(np.int64)
  extra = n - int(counts.sum())
  if extra:
    candidates = np.flatnonzero(exact - counts > 1e-9)
    # Largest deficit first; part index breaks ties, so the result is deterministic.
    order = sorted(candidates, key=lambda p: (-(deficit[p] + exact[p] - counts[p]), p))
    counts[order[:extra]] += 1
  return counts


def make_splits(cases: list[dict], *, test_fraction: float = 0.3, num_folds: int = 5,
                seed: int = 0) -> dict[str, Any]:
  """Splits cases by patient into a stratified test part and `num_folds` folds.

  Args:
    cases: dicts with `case_id`, `patient_id` and `strata` (the builder's case
      table, `info.metadata["cases"]`).
    test_fraction: share of patients held out as the test part.
    num_folds: number of cross-validation folds made from the other patients.
    seed: the same seed gives the same splits.

  Returns:
    {"seed", "test_fraction", "num_folds", "test": [case_id...],
     "folds": [[case_id...] x num_folds], "strata": {case_id: stratum}}; case
    ids within a part keep the order of `cases`.
  """
  if not 0.0 < test_fraction < 1.0:
    raise SplitsError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if num_folds < 2:
    raise SplitsError(f"num_folds must be at least 2, got {num_folds}")
  seen: set[str] = set()
  by_patient: dict[str, list[str]] = {}
  patient_stratum: dict[str, int] = {}
  strata: dict[str, int] = {}
  for i, case in enumerate(cases):
    missing = [k for k in ("case_id", "patient_id", "strata") if k not in case]
    if missing:
      raise SplitsError(f"case #{i} lacks {', '.join(missing)}; expected case_id, patient_id, strata")
    cid, pid = str(case["case_id"]), str(case["patient_id"])
    if cid in seen:
      raise SplitsError(f"case_id {cid} appears twice in the case table")
    seen.add(cid)
    strata[cid] = int(case["strata"])
    by_patient.setdefault(pid, []).append(cid)
    patient_stratum.setdefault(pid, int(case["strata"]))

  shares = np.array([test_fraction] + [(1.0 - test_fraction) / num_folds] * num_folds)
  rng = np.random.default_rng(seed)
  deficit = np.zeros(len(shares))
  parts: list[set[str]] = [set() for _ in shares]   # patient ids per part
  for stratum in sorted(set(patient_stratum.values())):
    patients = sorted(p for p, s in patient_stratum.items() if s == stratum)
    patients = [patients[i] for i in rng.permutation(len(patients))]
    counts = _apportion(len(patients), shares, deficit)
    deficit += len(patients) * shares - counts
    start = 0
    for part, count in zip(parts, counts):
      part.update(patients[start:start + count])
      start += count

  if any(not part for part in parts):
    raise SplitsError(
        f"{len(by_patient)} patients cannot make a {test_fraction:.0%} test part and "
        f"{num_folds} non-empty folds")

  def case_ids(patients: set[str]) -> list[str]:
    return [str(c["case_id"]) for c in cases if str(c["patient_id"]) in patients]

  return {
      "seed": int(seed),
      "test_fraction": float(test_fraction),
      "num_folds": int(num_folds),
      "test": case_ids(parts[0]),
      "folds": [case_ids(p) for p in parts[1:]],
      "strata": strata,
  }


def fold_cases(splits: dict[str, Any], k: int) -> tuple[list[str], list[str]]:
  """(train case ids = all other folds, validation case ids = fold k)."""
  folds = splits["folds"]
  if not 0 <= k < len(folds):
    raise SplitsError(f"fold {k} does not exist; the splits have folds 0..{len(folds) - 1}")
  train = [cid for j, fold in enumerate(folds) if j != k for cid in fold]
  return train, list(folds[k])


def save_splits(path, splits: dict[str, Any]) -> None:
  """Writes the splits as readable JSON (the work directory's splits.json)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(splits, indent=1) + "\n")
  tmp.replace(path)   # never leave a half-written splits file


def load_splits(path) -> dict[str, Any]:
  """Reads splits written by `save_splits`; SplitsError naming the file if malformed."""
  path = pathlib.Path(path)
  try:
    splits = json.loads(path.read_text())
  except FileNotFoundError:
    raise SplitsError(f"{path}: splits file not found") from None
  except json.JSONDecodeError as e:
    raise SplitsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  missing = [k for k in _KEYS if not isinstance(splits, dict) or k not in splits]
  if missing:
    raise SplitsError(f"{path}: missing keys {', '.join(missing)}; expected {', '.join(_KEYS)}")
  if len(splits["folds"]) != splits["num_folds"]:
    raise SplitsError(f"{path}: {len(splits['folds'])} folds listed but num_folds is {splits['num_folds']}")
  return splits
