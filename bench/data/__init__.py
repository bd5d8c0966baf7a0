"""Data: the data set registry, the CIFAR file format, the synthetic stand-in, the noise
groups and the splits every stage reads (uint8 NHWC images, int64 labels)."""

from bench.data.cifar import ImageSet
from bench.data.datasets import DatasetInfo, dataset_info, register_dataset
from bench.data.splits import load_test, load_train

__all__ = ["DatasetInfo", "ImageSet", "dataset_info", "load_test", "load_train", "register_dataset"]
