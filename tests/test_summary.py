"""The summary command: parameter counts from nnx.eval_shape, breakdown, XLA FLOPs, last line."""
import pathlib
import subprocess
import sys

import jax
from flax import nnx

from configs import nact, synthetic
from rst2g_jax import model as model_lib, summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_abstract_count_equals_allocated_model_and_breakdown_adds_up():
  cfg = synthetic.get_config().model
  real = model_lib.build_model(cfg, rngs=nnx.Rngs(0))
  allocated = sum(x.size for x in jax.tree.leaves(nnx.state(real, nnx.Param)))
  abstract = summary.abstract_model(cfg)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert summary.count_params(abstract) == allocated
  breakdown = summary.param_breakdown(abstract)
  assert sum(breakdown.values()) == allocated
  assert list(dict.fromkeys(k.split("/")[0] for k in breakdown)) == [
      "encoder", "msr", "stge", "decoder"]
  assert breakdown["encoder/vit"] == summary.count_params(real.encoder.vit)
  assert breakdown["stge/isa_pre"] == summary.count_params(real.stge.isa_pre)


def test_paper_vit_count_follows_the_config_arithmetic():
  cfg = nact.get_config().model
  breakdown = summary.param_breakdown(summary.abstract_model(cfg))
  d = cfg.features[-1]
  tokens = (cfg.image_size[0] // 2**len(cfg.features)) * (cfg.image_size[1] // 2**len(cfg.features))
  per_block = 12 * d * d + 13 * d    # qkv, out, MLP 4x (weights + biases), two LayerNorms
  assert breakdown["encoder/vit"] == cfg.vit_depth * per_block + tokens * d + 2 * d


def test_forward_flops_count_multiply_adds_of_dense_and_valid_conv():
  dense = nnx.Linear(16, 32, use_bias=False, rngs=nnx.Rngs(0))
  assert summary.forward_flops(dense, (4, 16)) == 2 * 4 * 16 * 32
  conv = nnx.Conv(3, 5, (3, 3), padding="VALID", use_bias=False, rngs=nnx.Rngs(0))
  assert summary.forward_flops(conv, (2, 8, 8, 3)) == 2 * 2 * 6 * 6 * 9 * 3 * 5


def test_summary_lines_end_with_the_parameter_count():
  config = nact.get_config()
  lines = summary.summarize(config, flops=False)
  total = summary.count_params(summary.abstract_model(config.model))
  assert lines[-1] == f"params: {total}"
  assert any(line.split()[0] == "stge" for line in lines[1:])


def test_cli_prints_flops_and_ends_with_params():
  result = subprocess.run(
      [sys.executable, "-m", "rst2g_jax.summary", "--config=configs/synthetic.py"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  lines = result.stdout.strip().splitlines()
  config = synthetic.get_config()
  model = summary.abstract_model(config.model)
  assert lines[-1] == f"params: {summary.count_params(model)}"
  slab = (1, config.data.slab) + tuple(config.model.image_size) + (3,)
  flops_line = next(line for line in lines if line.startswith("forward FLOPs per slab"))
  assert str(slab) in flops_line
  flops = float(flops_line.split(": ")[1].split()[0])
  assert abs(flops - summary.forward_flops(model, slab)) <= 1e-3 * flops


def test_cli_without_config_fails_cleanly():
  result = subprocess.run([sys.executable, "-m", "rst2g_jax.summary"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--config" in result.stderr and "Traceback" not in result.stderr
