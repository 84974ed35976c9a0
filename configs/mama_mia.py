"""The paper's protocol (configs/nact.py) on MAMA-MIA, the largest public set with expert masks.

Strata are the sub-collections (DUKE, ISPY1, ISPY2, NACT), so every fold and the test part
hold the same mix of sites and protocols. MAMA-MIA's baseline z-scores with the statistics
of all phases pooled; `data.normalization = "pooled"` is that reading, the default keeps
the project's pre-contrast body statistics. For the official train/test split build
`--config=official_split` and write its split to <workdir>/splits.json first (see
tfds_builders/mama_mia/README.md).
"""
from configs import nact


def get_config():
  config = nact.get_config()
  config.data.builder = "mama_mia"
  config.data.builder_config = "default"
  config.data.post_phase = 1           # first post-contrast (every case has >= 2 phases)
  return config
