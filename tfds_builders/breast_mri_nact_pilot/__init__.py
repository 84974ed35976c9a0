"""TCIA Breast-MRI-NACT-Pilot: DCE-MRI exams and their functional tumor volume."""
from tfds_builders.breast_mri_nact_pilot.breast_mri_nact_pilot_dataset_builder import Builder

__all__ = ["Builder"]
