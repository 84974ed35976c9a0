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
  # The paper's network (85.24 M parameters; depth 6, 4 heads). Widths per scale
  # C = (48, 96, 192, 384, 752) at strides 1, 2, 4, 8, 16, so a 256x256 slice gives a 16x16
  # bottleneck: N = 256 ViT tokens and GAT nodes. `python -m rst2g_jax.summary` prints:
  #   encoder  51,684,160  stem 21,360; DownBlocks 129,504 + 517,056 + 2,066,304 + 7,980,976
  #                        (each 9 Cin C + 9 C^2 + (Cin + 1) C 1x1 projection + 4 C BN);
  #                        ViT 40,968,960 = 6 blocks x (12 D^2 + 13 D) + 256 D position
  #                        embedding + 2 D final LN, D = 752
  #   msr       6,077,524  4 skip scales (C = 48..384), each ~31 C^2: 3 x 9 C^2 modality convs
  #                        + 3 C^2 + C^2 channel MLP
  #   stge     20,937,185  3 ISA x 6,224,304 (9 C^2 conv + C^2 GAT + C^2 gate, C = 752)
  #                        + ITA 2,264,273 (3 C^2 + C^2 MLP)
  #   decoder   6,833,473  4 UpBlocks, each 4 Cin C transposed conv + 27 C^2 convs; 1x1 head
  #   total    85,532,342  = 85.53 M, +0.34 % of the paper's 85.24 M
  config.model = m = ml_collections.ConfigDict()
  m.name = "rst2g"            # "rst2g" | "unet"
  m.image_size = (256, 256)   # (H, W) the ViT position embedding is sized for
  m.stem_features = 48
  m.features = (96, 192, 384, 752)  # one entry per DownBlock; total stride 2**len
  m.vit_depth = 6
  m.vit_heads = 4
  m.vit_mlp_ratio = 4
  m.use_local = True          # False: encoder 3x3 convs -> 1x1 (paper Table 4 "w/o CFE-L")
  m.use_global = True         # False: no ViT blocks ("w/o CFE-G")
  m.use_msr = True            # False: post-contrast encoder features as skips ("w/o MSR")
  m.use_stge = True           # False: post-contrast bottleneck to the decoder ("w/o STGE")
  m.isa = ml_collections.ConfigDict({"mode": "paper"})  # "paper": graph per slice | "slab"
  m.bn_momentum = 0.9         # Flax convention (PyTorch momentum 0.1)
  m.bn_epsilon = 1e-5
  # Running variance from the unbiased batch variance, as torch.nn.BatchNorm2d (the paper's
  # framework) does; False gives flax.nnx.BatchNorm's biased update.
  m.bn_unbiased_running_var = True

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
  d.worker_count = 0           # Grain worker processes (0: threads in this process)
  d.read_threads = 2           # threads per process decoding and slicing cases
  d.prefetch_batches = 4       # batches read ahead per process
  d.cache_mb = 1024            # normalised cases kept per process (0 disables)

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
  e.batch_size = 0            # slabs per inference call; 0 -> one per device on "data"
  e.num_previews = 2          # preview PNGs per fold (first test cases)
  return config
