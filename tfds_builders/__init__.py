"""TFDS builders of the project's collections; importing this registers them with TFDS."""
from tfds_builders import breast_mri_nact_pilot  # noqa: F401
from tfds_builders import synthetic_dce  # noqa: F401
from tfds_builders import mama_mia  # noqa: F401
from tfds_builders import tcga_brca  # noqa: F401
from tfds_builders import zhang_external  # noqa: F401
