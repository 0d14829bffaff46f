"""Data: MedMNIST files → partitions → client shards (Arrow, memory-mapped)."""

from raymed.data.medmnist_files import DatasetFile, locate, locate_all, verify, write_synthetic
from raymed.data.partition import partition
from raymed.data.shards import ClientShard, ShardSet, Split, materialise
from raymed.data.tasks import TaskSpec

__all__ = [
    "ClientShard",
    "DatasetFile",
    "ShardSet",
    "Split",
    "TaskSpec",
    "locate",
    "locate_all",
    "materialise",
    "partition",
    "verify",
    "write_synthetic",
]
