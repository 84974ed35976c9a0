"""Patient-level stratified splits: leakage, proportions, determinism, JSON."""
import json

import numpy as np
import pytest

from rst2g_jax import splits as splits_lib


def _one_exam_cases(num_patients=97, num_strata=3, seed=1):
  rng = np.random.default_rng(seed)
  # Unequal strata sizes so that rounding is exercised.
  strata = rng.choice(num_strata, size=num_patients, p=[0.5, 0.3, 0.2][:num_strata])
  return [{"case_id": f"C{i:03d}", "patient_id": f"P{i:03d}", "strata": int(s)}
          for i, s in enumerate(strata)]


def _multi_exam_cases(num_patients=40, seed=2):
  """NACT-like: 1-4 visits per patient, visits of one patient listed apart."""
  rng = np.random.default_rng(seed)
  cases = []
  for p in range(num_patients):
    stratum = int(rng.integers(3))
    for v in range(int(rng.integers(1, 5))):
      # Later visits may fall in another tumor-volume stratum (tumor shrinks).
      cases.append({"case_id": f"P{p:02d}_V{v}", "patient_id": f"P{p:02d}",
                    "strata": stratum if v == 0 else int(rng.integers(3))})
  order = rng.permutation(len(cases))
  return [cases[i] for i in order]


def _parts(s):
  return [s["test"]] + list(s["folds"])


def test_every_case_in_exactly_one_part_and_no_patient_in_two():
  cases = _multi_exam_cases()
  s = splits_lib.make_splits(cases, seed=0)
  parts = _parts(s)
  all_ids = [cid for part in parts for cid in part]
  assert sorted(all_ids) == sorted(c["case_id"] for c in cases)
  patient = {c["case_id"]: c["patient_id"] for c in cases}
  owners = {}
  for k, part in enumerate(parts):
    for cid in part:
      assert owners.setdefault(patient[cid], k) == k, f"patient {patient[cid]} in parts {owners[patient[cid]]} and {k}"
  assert len(s["folds"]) == 5 and all(s["folds"])
  # ~30 % of the patients are test patients.
  test_patients = {patient[c] for c in s["test"]}
  assert abs(len(test_patients) - 0.3 * 40) < 1


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("test_fraction,num_folds", [(0.3, 5), (0.2, 4)])
def test_strata_proportions_within_one_case_per_part(seed, test_fraction, num_folds):
  cases = _one_exam_cases()
  s = splits_lib.make_splits(cases, test_fraction=test_fraction, num_folds=num_folds, seed=seed)
  shares = [test_fraction] + [(1 - test_fraction) / num_folds] * num_folds
  totals = {st: sum(c["strata"] == st for c in cases) for st in range(3)}
  for part, share in zip(_parts(s), shares):
    assert abs(len(part) - share * len(cases)) < 1
    for st, total in totals.items():
      count = sum(s["strata"][cid] == st for cid in part)
      assert abs(count - share * total) < 1, (st, count, share * total)


def test_patient_stratum_is_first_exam_and_case_strata_recorded():
  cases = _multi_exam_cases()
  s = splits_lib.make_splits(cases, seed=3)
  assert s["strata"] == {c["case_id"]: c["strata"] for c in cases}
  # Patients (by their first listed exam's stratum) are balanced within one per part.
  first = {}
  for c in cases:
    first.setdefault(c["patient_id"], c["strata"])
  shares = [0.3] + [0.14] * 5
  for part, share in zip(_parts(s), shares):
    pats = {cid.split("_")[0] for cid in part}
    for st in range(3):
      n = sum(v == st for v in first.values())
      assert abs(sum(first[p] == st for p in pats) - share * n) < 1


def test_deterministic_for_a_seed_and_different_across_seeds():
  cases = _one_exam_cases()
  a = splits_lib.make_splits(cases, seed=5)
  b = splits_lib.make_splits(list(reversed(cases)), seed=5)
  assert a == splits_lib.make_splits(cases, seed=5)
  # The input order changes listing order only, never the membership.
  assert [sorted(p) for p in _parts(a)] == [sorted(p) for p in _parts(b)]
  c = splits_lib.make_splits(cases, seed=6)
  assert sorted(a["test"]) != sorted(c["test"])


def test_fold_cases_and_json_round_trip(tmp_path):
  s = splits_lib.make_splits(_multi_exam_cases(), seed=0)
  train, val = splits_lib.fold_cases(s, 2)
  assert val == s["folds"][2]
  assert sorted(train + val) == sorted(c for f in s["folds"] for c in f)
  assert not set(train) & set(val) and not set(train + val) & set(s["test"])
  path = tmp_path / "work" / "splits.json"
  splits_lib.save_splits(path, s)
  assert splits_lib.load_splits(path) == s
  assert json.loads(path.read_text())["num_folds"] == 5
  with pytest.raises(splits_lib.SplitsError, match="fold 5 does not exist"):
    splits_lib.fold_cases(s, 5)


def test_bad_inputs_give_clear_errors(tmp_path):
  with pytest.raises(splits_lib.SplitsError, match="appears twice"):
    splits_lib.make_splits([{"case_id": "A", "patient_id": "p", "strata": 0}] * 2)
  with pytest.raises(splits_lib.SplitsError, match="lacks strata"):
    splits_lib.make_splits([{"case_id": "A", "patient_id": "p"}])
  with pytest.raises(splits_lib.SplitsError, match="5 patients cannot make"):
    splits_lib.make_splits(_one_exam_cases(5))
  bad = tmp_path / "splits.json"
  bad.write_text('{"seed": 0}')
  with pytest.raises(splits_lib.SplitsError, match=r"splits.json: missing keys test_fraction"):
    splits_lib.load_splits(bad)
  bad.write_text("{not json")
  with pytest.raises(splits_lib.SplitsError, match="not valid JSON"):
    splits_lib.load_splits(bad)
