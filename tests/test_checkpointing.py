"""Fold checkpoints: last-N rotation, best kept apart, exact restore incl. the Grain position."""
import grain
import jax
import ml_collections
import numpy as np
from flax import nnx

from rst2g_jax import checkpointing
from rst2g_jax import train_state as ts


def _state(mesh, seed=0):
  model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(seed)),
                         nnx.BatchNorm(4, rngs=nnx.Rngs(seed)))
  _, params, rest = ts.split_model(model)
  tx = ts.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-3, weight_decay=1e-4, schedule="constant", warmup_steps=0,
      grad_clip_norm=0.0, num_steps=10)))
  return ts.init_train_state(params, rest, tx, seed, mesh)


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_last_and_best_roundtrip_with_data_position(tmp_path):
  mesh = ts.make_mesh(ml_collections.ConfigDict({"data": 2}))
  ds = grain.MapDataset.range(100).seed(3).shuffle().to_iter_dataset()
  it = iter(ds)
  states = {}
  ck = checkpointing.FoldCheckpoints(tmp_path / "ckpt", keep=2)
  for step in (1, 2, 3):
    next(it)
    states[step] = _state(mesh, seed=step)
    ck.save_last(step, states[step], it, {"best_dsc": 0.1 * step})
  ck.save_best(2, states[2], {"best_dsc": 0.2, "best_step": 2})
  expected_next = [next(it) for _ in range(3)]
  ck.wait()
  ck.close()

  ck = checkpointing.FoldCheckpoints(tmp_path / "ckpt", keep=2)
  assert sorted(ck.last.all_steps()) == [2, 3]   # keep=2 newest
  assert ck.latest_step() == 3 and ck.best_step() == 2
  target = ts.abstract_state(_state(mesh), mesh)
  fresh = iter(ds)
  restored, meta = ck.restore_last(target, fresh)
  assert meta["best_dsc"] == 0.30000000000000004 or abs(meta["best_dsc"] - 0.3) < 1e-12
  assert _equal(restored, states[3])
  assert restored.params["layers"][0]["kernel"].sharding.is_equivalent_to(ts.replicated(mesh), 4)
  assert [next(fresh) for _ in range(3)] == expected_next
  best, best_meta = ck.restore_best(target)
  assert _equal(best, states[2]) and best_meta["best_step"] == 2
  assert not _equal(best, states[3])
  ck.close()
