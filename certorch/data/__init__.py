"""Datasets: metadata registry and loaders (pixels in [0, 1])."""
from certorch.data.registry import DATASETS, DatasetInfo, dataset_info, register_dataset

__all__ = ["DATASETS", "DatasetInfo", "dataset_info", "register_dataset"]
