"""A config for tests: the synthetic `tiny` collection (6 exams, 8x32x32) and a tiny RST2G.

Two folds (the tiny collection has too few patients for five), 4 steps, one device.
"""
from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.data.builder_config = "tiny"
  m = config.model
  m.image_size = (32, 32)
  m.stem_features = 4
  m.features = (8, 16)
  m.vit_depth = 1
  m.vit_heads = 2
  config.cv.num_folds = 2
  config.cv.folds = "0"
  t = config.train
  t.batch_size = 2
  t.num_steps = 4
  t.eval_every = 2
  t.log_every = 2
  t.checkpoint_every = 2
  config.mesh.data = 1
  config.eval.num_previews = 1
  return config
