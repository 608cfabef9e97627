"""Data layer: sources -> verified WebDataset shards + a committed manifest; shard reading.

See docs/data.md for the shard and manifest formats and the errors users can meet.
"""

from pipeline.data.images import decode_image
from pipeline.data.manifest import Manifest, ShardInfo, SplitInfo
from pipeline.data.prepare import prepare
from pipeline.data.samples import DataError, ImageDecodeError, Sample, sha256_file
from pipeline.data.shards import read_shard, write_shard

__all__ = [
    "DataError", "ImageDecodeError", "Manifest", "Sample", "ShardInfo", "SplitInfo",
    "decode_image", "prepare", "read_shard", "sha256_file", "write_shard",
]
