from distrnn.data.base import RecurrentDataModule
from distrnn.data.loaders import GeneratedLoader, ResumableLoader, StreamLoader, TensorLoader
from distrnn.data.mnist import SequentialMNISTDataModule
from distrnn.data.synthetic import SyntheticDataModule
from distrnn.data.text import ByteCorpusDataModule
from distrnn.data.timeseries import TimeSeriesDataModule
from distrnn.data.tokens import TokenFileDataModule

__all__ = [
    "ByteCorpusDataModule",
    "GeneratedLoader",
    "RecurrentDataModule",
    "ResumableLoader",
    "SequentialMNISTDataModule",
    "StreamLoader",
    "SyntheticDataModule",
    "TensorLoader",
    "TimeSeriesDataModule",
    "TokenFileDataModule",
]
