"""Datasets as in-memory tensors with pixels in [0, 1]; normalization is a model layer.

    from certorch.data import load, augment_batch
    ds = load("digits", "train")          # offline; also "mnist", "fashion-mnist", "cifar10"
    x, y = ds.images[:128], ds.labels[:128]
"""
from certorch.data.augment import augment_batch, random_crop, random_hflip
from certorch.data.dataset import ImageDataset
from certorch.data.fetch import download
from certorch.data.loaders import load, raw_arrays
from certorch.data.locate import find_files, search_roots
from certorch.data.registry import DATASETS, DatasetInfo, dataset_info, register_dataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageDataset",
    "augment_batch",
    "dataset_info",
    "download",
    "find_files",
    "load",
    "random_crop",
    "random_hflip",
    "raw_arrays",
    "register_dataset",
    "search_roots",
]
