"""TCIA TCGA-BRCA breast DCE-MRI with the TCGA-Breast-Radiogenomics lesion masks."""
from tfds_builders.tcga_brca.tcga_brca_dataset_builder import Builder, TcgaConfig

__all__ = ["Builder", "TcgaConfig"]
