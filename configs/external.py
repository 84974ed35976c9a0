"""The paper's external test (Table 3): a TCGA-BRCA-trained work directory on Zhang et al.'s set.

  python -m rst2g_jax.evaluate --config=configs/external.py --workdir=W \
      --config.data.manual_dir=<unpacked Zenodo 8068383>

W was trained with configs/tcga.py; its `config.json` gives the model and its preprocessing,
this config the collection (`zhang_external`, the paper's 60x256x256 grid) and the
whole-volume inference settings (those of configs/tcga.py).
"""
from configs import tcga


def get_config():
  config = tcga.get_config()
  config.data.builder = "zhang_external"
  config.data.builder_config = "default"
  return config
