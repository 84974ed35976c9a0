"""MAMA-MIA: 1506 breast DCE-MRI cases (DUKE, ISPY1, ISPY2, NACT) with expert tumor masks."""
from tfds_builders.mama_mia.mama_mia_dataset_builder import Builder, official_splits

__all__ = ["Builder", "official_splits"]
