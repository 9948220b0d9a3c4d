"""The input side: WebDataset loading (exact or resampled epochs, resumable), shard writing, the toy data set."""

from .images import BadSample, decode_image, resize_crop
from .loader import Batch, DataConfig, DataError, Loader, resolve_shards
from .toy import toy_sample

__all__ = ["Batch", "BadSample", "DataConfig", "DataError", "Loader", "decode_image", "resize_crop",
           "resolve_shards", "toy_sample"]
