"""Paper setting on TCIA Breast-MRI-NACT-Pilot (Xie et al. 2026, Implementation details).

Model: the paper's network from base.py, 85,532,342 parameters (+0.34 % of the paper's
85.24 M; per-part arithmetic in base.py's model section): widths (48, 96, 192, 384, 752),
ViT depth 6 with 4 heads on 256x256 slices. Adam lr 1e-3 with coupled L2 weight decay 1e-4,
batch 4 slices (1 slab of 4), loss Dice + 0.5 BCE + 0.2 Boundary.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.data.builder = "breast_mri_nact_pilot"
  config.data.builder_config = "default"
  config.data.slab = 4                 # the paper's batch of 4 slices ...
  config.train.batch_size = 1          # ... as one slab per step
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 1e-4
  config.loss.bce_weight = 0.5         # lambda
  config.loss.boundary_weight = 0.2    # beta
  config.model.image_size = (256, 256)
  config.model.vit_depth = 6
  config.model.vit_heads = 4
  return config
