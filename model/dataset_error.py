"""The one error of the data layer, below both of its users: model/datasets.py opens datasets and
model/converters.py turns other layouts into COCO dicts for it, and each raises this."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset (or one of its images) that cannot be used, with the file and entry named."""
