"""The data set registry, where users import it to add a data set (`register_dataset`).

It lives in bench.data.datasets; this module keeps the documented import path.
"""

from bench.data.datasets import DATASETS, DatasetInfo, Release, dataset_info, register_dataset

__all__ = ["DATASETS", "DatasetInfo", "Release", "dataset_info", "register_dataset"]
