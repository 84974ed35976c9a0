"""The paper's external test set (Zenodo 8068383): NIfTI phases P0..P5 and per-centre masks."""
from tfds_builders.zhang_external.zhang_external_dataset_builder import Builder, LayoutConfig

__all__ = ["Builder", "LayoutConfig"]
