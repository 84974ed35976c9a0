"""The external test without a download: a configs/synthetic.py work directory on the
synthetic "external centre" (other scanner scale, noise, bias, flip angle and timing;
the same 16x64x64 grid as `small`).

  python -m rst2g_jax.evaluate --config=configs/synthetic_external.py --workdir=W
"""
from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.data.builder_config = "external"
  return config
