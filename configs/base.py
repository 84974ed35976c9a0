"""Shared defaults for every experiment; variants import this and override fields.

Sections: `model` (architecture), `data` (collection and input pipeline), `loss`,
`train` (optimizer, precision, steps), `cv` (cross-validation protocol),
`mesh` (device parallelism), `eval` (whole-volume inference).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- model (DESIGN.md §4) ---
  config.model = m = ml_collections.ConfigDict()
  m.name = "rst2g"            # "rst2g" | "unet"
  m.stem_features = 32
  m.features = (64, 128, 256)  # one entry per DownBlock; total stride 2**len
  m.vit_depth = 6
  m.vit_heads = 4
  m.vit_mlp_ratio = 4
  m.use_local = True
  m.use_global = True
  m.use_msr = True
  m.use_stge = True
  m.isa = ml_collections.ConfigDict({"mode": "paper"})  # "paper" | "slab"
  m.bn_momentum = 0.9         # Flax convention (PyTorch momentum 0.1)
  m.bn_epsilon = 1e-5

  # --- data (DESIGN.md §2-3) ---
  config.data = d = ml_collections.ConfigDict()
  d.builder = "synthetic_dce"
  d.builder_config = "small"
  d.data_dir = ""             # "" -> <workdir>/tfds
  d.manual_dir = ""
  d.slab = 4                  # S_slab: consecutive slices per example
  d.post_phase = 1
  d.normalization = "pre_body"  # "pre_body" | "pooled" | "per_phase"
  d.foreground_fraction = 0.5   # share of slabs drawn to contain tumor
  d.worker_count = 0
  d.stratify_by = "strata"

  # --- loss (DESIGN.md §5, eqs. 17-20) ---
  config.loss = ml_collections.ConfigDict()
  config.loss.bce_weight = 0.5      # lambda
  config.loss.boundary_weight = 0.2  # beta
  config.loss.dice_eps = 1.0

  # --- training ---
  config.train = t = ml_collections.ConfigDict()
  t.batch_size = 1            # slabs per global batch (x slab slices)
  t.learning_rate = 1e-3
  t.weight_decay = 1e-4       # coupled L2, as torch.optim.Adam(weight_decay)
  t.schedule = "constant"     # "constant" | "cosine"
  t.warmup_steps = 0
  t.grad_clip_norm = 0.0      # 0 disables clipping
  t.num_steps = 1000
  t.eval_every = 250
  t.log_every = 50
  t.checkpoint_every = 250
  t.keep_checkpoints = 2
  t.dtype = "float32"         # compute dtype: "float32" | "bfloat16"
  t.remat = False

  # --- cross-validation (DESIGN.md §3) ---
  config.cv = c = ml_collections.ConfigDict()
  c.num_folds = 5
  c.test_fraction = 0.3
  c.folds = ""                # "" -> all; "0,2" -> a subset

  # --- parallelism ---
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1       # -1 -> all devices on the data axis
  config.mesh.distributed = False

  # --- whole-volume inference (DESIGN.md §7a) ---
  config.eval = e = ml_collections.ConfigDict()
  e.slab_step = 2             # slices between slab starts (half a slab)
  e.blend = "gaussian"        # "gaussian" | "uniform"
  e.mirror_tta = False
  e.threshold = 0.5
  e.largest_component = False
  return config
