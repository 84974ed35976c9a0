"""What a cross-validation run leaves on disk: JSON/Markdown/CSV tables, curves, previews.

File formats (DESIGN.md §8):
- `fold_<k>/summary.json` — nnU-Net's schema: `metric_per_case` (one entry per
  test case with `metrics` for label "1"), `mean` ({"1": means}) and
  `foreground_mean`; keys Dice, IoU, TP, FP, FN, n_pred, n_ref as nnU-Net, plus
  RVD, HD95, ASSD.
- `fold_<k>/test_metrics.json` — this project's per-case metrics and their
  `metrics.summarize` summary; its presence marks the fold finished.
- `fold_<k>/metrics.jsonl` — one JSON object per logged step (training curves).
- `results.{json,md,csv}` — the paper's Table 1 layout over all finished folds.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from rst2g_jax import metrics as metrics_lib

TABLE_METRICS = ("dsc", "ji", "rvd", "abs_rvd", "hd95", "assd")
_PERCENT = {"dsc", "ji"}
TABLE_LABELS = {"dsc": "DSC/%", "ji": "JI/%", "rvd": "RVD", "abs_rvd": "\\|RVD\\|",
           "hd95": "HD95/mm", "assd": "ASSD/mm"}

CONVENTION = (
    "Empty masks: when prediction and reference are both empty, DSC = JI = 1 and RVD = 0 "
    "(nnU-Net reports Dice = NaN there); HD95 and ASSD are undefined whenever either mask "
    "is empty and are left out of the means (counts below). RVD = (|P| - |G|) / |G| is "
    "signed; |RVD| is its magnitude. HD95 is MONAI's (larger of the two directed 95th "
    "percentiles), ASSD the mean of the two directed mean surface distances, both in mm.")


# -- small file helpers ----------------------------------------------------------------
def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename): a file is complete or absent."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")
  tmp.replace(path)


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(pathlib.Path(path).read_text())


def as_float(value) -> float:
  """A metric read back from JSON, where an undefined value was written as null."""
  return float("nan") if value is None else float(value)


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None   # strict JSON: an undefined metric (e.g. the SD of one value) is null
  return obj


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
  """Drops records past `max_step` (written after the checkpoint a resume starts from)."""
  path = pathlib.Path(path)
  if path.exists():
    keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)


# -- per fold ----------------------------------------------------------------------------
def nnunet_summary(per_case: Sequence[dict]) -> dict:
  """nnU-Net's summary.json layout for one foreground label ("1")."""
  def entry(c):
    return {"Dice": c["dsc"], "IoU": c["ji"], "TP": c["tp"], "FP": c["fp"], "FN": c["fn"],
            "n_pred": c["n_pred"], "n_ref": c["n_ref"], "RVD": c["rvd"], "HD95": c["hd95"],
            "ASSD": c["assd"]}

  cases = [{"case_id": c["case_id"], "metrics": {"1": entry(c)},
            "prediction_file": None, "reference_file": c["case_id"]} for c in per_case]
  means = {}
  for key in ("Dice", "IoU", "TP", "FP", "FN", "n_pred", "n_ref", "RVD", "HD95", "ASSD"):
    values = np.asarray([float(e["metrics"]["1"][key]) for e in cases], np.float64)
    values = values[~np.isnan(values)]
    means[key] = float(values.mean()) if values.size else float("nan")
  return {"metric_per_case": cases, "mean": {"1": means}, "foreground_mean": dict(means),
          "convention": CONVENTION}


def fold_record(fold: int, per_case: Sequence[dict], *, best_step: int, val_dsc: float,
                val_dsc_largest_component: float, largest_component_applied: bool,
                steps: int, train_seconds: float) -> dict:
  """The test_metrics.json content of one finished fold."""
  return {
      "fold": int(fold), "best_step": int(best_step), "steps": int(steps),
      "val_dsc": float(val_dsc), "val_dsc_largest_component": float(val_dsc_largest_component),
      "largest_component_improves_val": bool(val_dsc_largest_component > val_dsc),
      "largest_component_applied": bool(largest_component_applied),
      "train_seconds": float(train_seconds),
      "summary": metrics_lib.summarize(list(per_case)),
      "per_case": [dict(c) for c in per_case],
  }


# -- over folds --------------------------------------------------------------------------
def _mean_sd(values: Iterable[float]) -> dict:
  arr = np.asarray([v for v in values if not math.isnan(float(v))], np.float64)
  return {"mean": float(arr.mean()) if arr.size else float("nan"),
          "sd": float(arr.std(ddof=1)) if arr.size > 1 else float("nan"),
          "n": int(arr.size)}


def aggregate(fold_records: Sequence[dict]) -> dict:
  """results.json: test metrics as mean ± SD over folds and over test cases.

  "test": per metric, the mean and sample SD of the folds' mean test values.
  "test_by_case": each test case's value averaged over the folds, then mean and
  SD over cases (the spread between patients rather than between folds).
  """
  folds = sorted(fold_records, key=lambda r: r["fold"])
  over_folds = {k: _mean_sd(as_float(r["summary"][k]["mean"]) for r in folds)
                for k in TABLE_METRICS}
  by_case: dict[str, dict[str, list[float]]] = {}
  for r in folds:
    for c in r["per_case"]:
      slot = by_case.setdefault(c["case_id"], {k: [] for k in TABLE_METRICS})
      for k in TABLE_METRICS:
        slot[k].append(as_float(c[k]))
  case_means = {cid: {k: (float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan"))
                      for k, v in vals.items()} for cid, vals in by_case.items()}
  over_cases = {k: _mean_sd(m[k] for m in case_means.values()) for k in TABLE_METRICS}
  counts = {key: sum(r["summary"]["counts"][key] for r in folds)
            for key in ("cases", "both_empty", "pred_empty", "ref_empty")}
  return {
      "test": over_folds,
      "test_by_case": over_cases,
      "num_test_cases": len(by_case),
      "empty_mask_counts": counts,
      "convention": CONVENTION,
      "folds": [{"fold": r["fold"], "best_step": r["best_step"], "val_dsc": r["val_dsc"],
                 "val_dsc_largest_component": r["val_dsc_largest_component"],
                 "largest_component_improves_val": r["largest_component_improves_val"],
                 "train_seconds": r["train_seconds"],
                 **{k: as_float(r["summary"][k]["mean"]) for k in TABLE_METRICS}} for r in folds],
  }


def table_header() -> str:
  """The header rows of every results table (one column per metric)."""
  cols = TABLE_METRICS
  return "| | " + " | ".join(TABLE_LABELS[k] for k in cols) + " |\n|---|" + "---|" * len(cols) + "\n"


def format_stat(stat: dict, key: str) -> str:
  scale = 100.0 if key in _PERCENT else 1.0
  mean, sd = stat["mean"] * scale, stat["sd"] * scale
  if math.isnan(mean):
    return "n/a"
  digits = 1 if key in _PERCENT else 2
  return f"{mean:.{digits}f} ± {sd:.{digits}f}" if not math.isnan(sd) else f"{mean:.{digits}f}"


def results_markdown(results: dict, *, title: str = "Test results") -> str:
  """The paper's Table 1 layout (mean ± SD) plus per-fold rows."""
  cols = TABLE_METRICS
  head = table_header()
  rows = [f"| mean ± SD over folds (n={len(results['folds'])}) | "
          + " | ".join(format_stat(results["test"][k], k) for k in cols) + " |",
          f"| mean ± SD over test cases (n={results['num_test_cases']}) | "
          + " | ".join(format_stat(results["test_by_case"][k], k) for k in cols) + " |"]
  fold_rows = []
  for f in results["folds"]:
    cells = []
    for k in cols:
      v = f[k] * (100.0 if k in _PERCENT else 1.0)
      cells.append("n/a" if math.isnan(v) else f"{v:.{1 if k in _PERCENT else 2}f}")
    fold_rows.append(f"| fold {f['fold']} (best step {f['best_step']}, val DSC "
                     f"{100 * f['val_dsc']:.1f}%) | " + " | ".join(cells) + " |")
  lcc = [f for f in results["folds"]]
  improves = sum(f["largest_component_improves_val"] for f in lcc)
  counts = results["empty_mask_counts"]
  return (f"# {title}\n\n" + head + "\n".join(rows) + "\n\n## Per fold\n\n" + head
          + "\n".join(fold_rows) + "\n\n"
          f"Largest-connected-component postprocessing improves validation DSC in {improves} of "
          f"{len(lcc)} folds.\n\n"
          f"Metric conventions: {CONVENTION}\n\n"
          f"Case counts over all folds: {counts['cases']} test predictions, "
          f"{counts['both_empty']} with both masks empty, {counts['pred_empty']} with an empty "
          f"prediction only, {counts['ref_empty']} with an empty reference only.\n")


def results_csv(results: dict) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(["row", *[f"{k}_{s}" for k in TABLE_METRICS for s in ("mean", "sd")]])
  for name, block in (("over_folds", results["test"]), ("over_cases", results["test_by_case"])):
    writer.writerow([name, *[block[k][s] for k in TABLE_METRICS for s in ("mean", "sd")]])
  for f in results["folds"]:
    writer.writerow([f"fold_{f['fold']}", *[v for k in TABLE_METRICS for v in (f[k], "")]])
  return out.getvalue()


def write_results(workdir: str | os.PathLike, results: dict, *, title: str = "Test results") -> None:
  workdir = pathlib.Path(workdir)
  write_json(workdir / "results.json", results)
  (workdir / "results.md").write_text(results_markdown(results, title=title))
  (workdir / "results.csv").write_text(results_csv(results))


# -- figures -----------------------------------------------------------------------------
def plot_curves(path: str | os.PathLike, fold_logs: dict[int, list[dict]]) -> None:
  """Training loss and validation DSC against step, one line per fold."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_dsc) = plt.subplots(1, 2, figsize=(10, 4))
  for fold, records in sorted(fold_logs.items()):
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_dsc" in r]
    if train:
      ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"fold {fold}")
    if val:
      ax_dsc.plot([r["step"] for r in val], [r["val_dsc"] for r in val], marker="o",
                  label=f"fold {fold}")
  ax_loss.set(xlabel="step", ylabel="training loss", title="Dice + 0.5 BCE + 0.2 boundary")
  ax_dsc.set(xlabel="step", ylabel="validation DSC (whole volume)", ylim=(0, 1))
  for ax in (ax_loss, ax_dsc):
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_preview(path: str | os.PathLike, image: np.ndarray, truth: np.ndarray,
                 pred: np.ndarray, *, title: str = "") -> None:
  """One slice (the one with most tumor) as pre | post | residual | truth | prediction."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  per_slice = np.asarray(truth).reshape(truth.shape[0], -1).sum(1)
  if per_slice.max() == 0:
    per_slice = np.asarray(pred).reshape(pred.shape[0], -1).sum(1)
  z = int(np.argmax(per_slice))
  panels = [("pre", image[z, ..., 0]), ("post", image[z, ..., 1]), ("residual", image[z, ..., 2]),
            ("truth", truth[z]), ("prediction", pred[z])]
  fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
  for ax, (name, panel) in zip(axes, panels):
    cmap = "gray" if name in ("pre", "post") else ("magma" if name == "residual" else "viridis")
    ax.imshow(np.asarray(panel, np.float32), cmap=cmap)
    ax.set_title(name)
    ax.axis("off")
  fig.suptitle(f"{title} slice {z}")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
