"""Orbax checkpoints of one fold: the last N steps, and the best by validation DSC.

Layout under `<fold>/checkpoints/`:
  last/<step>/{state, data, meta}   rolling, `keep` newest kept (resume point)
  best/<step>/{state, meta}         the one with the highest validation DSC

`state` is the TrainState pytree (params, BatchNorm statistics, optimizer state,
step, RNG); `data` is the Grain iterator position (Grain's own Orbax handler,
one JSON file per process), so that a resumed fold sees exactly the batches an
uninterrupted one would; `meta` is JSON (best DSC so far, ...).
"""
from __future__ import annotations

import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp


class FoldCheckpoints:
  """The two CheckpointManagers of one fold."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    last_opts = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                             enable_async_checkpointing=async_save)
    best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=async_save)
    self.last = ocp.CheckpointManager(
        self.directory / "last", options=last_opts, item_names=("state", "data", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self.best = ocp.CheckpointManager(
        self.directory / "best", options=best_opts, item_names=("state", "meta"))

  # -- saving ----------------------------------------------------------------------
  def save_last(self, step: int, state: Any, data_iterator: Any, meta: dict) -> None:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.last.save(int(step), args=ocp.args.Composite(**items), force=True)

  def save_best(self, step: int, state: Any, meta: dict) -> None:
    """Replaces the best checkpoint. A step already saved (a resumed run re-validating the
    same weights) is kept as is: training is deterministic, so it holds the same state."""
    if step in self.best.all_steps():
      return
    self.best.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.last.close()
    self.best.close()

  # -- restoring -------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def best_step(self) -> int | None:
    return self.best.latest_step()

  def restore_last(self, abstract_state: Any, data_iterator: Any = None,
                   step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of the newest (or given) step; sets `data_iterator`'s position.

    A step saved without a `data` item (weights converted by `convert_torch`) leaves the
    iterator at its start.
    """
    step = self.last.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory / 'last'}")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None and (self.directory / "last" / str(step) / "data").is_dir():
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self.last.restore(step, args=ocp.args.Composite(**items))
    return out["state"], dict(out["meta"])

  def restore_best(self, abstract_state: Any) -> tuple[Any, dict]:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint under {self.directory / 'best'}")
    out = self.best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])
