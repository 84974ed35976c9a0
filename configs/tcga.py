"""Paper setting on TCIA TCGA-BRCA: the NACT-Pilot setting (configs/nact.py), other collection."""
from configs import nact


def get_config():
  config = nact.get_config()
  config.data.builder = "tcga_brca"
  config.data.builder_config = "default"
  return config
