"""Lightning data modules: image data, and the zoo of target networks for meta-training."""
from .images import DatasetError, DataSplit, ImageDataModule
from .zoo import ModelZooDataModule
from .zoo_manifest import ZooError

__all__ = ["DataSplit", "DatasetError", "ImageDataModule", "ModelZooDataModule", "ZooError"]
