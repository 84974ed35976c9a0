"""Synthetic breast DCE-MRI phantoms: the project's embedded default collection."""
from tfds_builders.synthetic_dce.synthetic_dce_dataset_builder import Builder, SyntheticConfig

__all__ = ["Builder", "SyntheticConfig"]
