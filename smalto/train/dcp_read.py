"""Reading a DCP checkpoint without running code from it: `load_dcp(state, folder)` in place of `dcp.load`.

torch.distributed.checkpoint reads `.metadata` with plain `pickle.load`, and its default load planner reads every
item the metadata declares as bytes with `torch.load(weights_only=False)`: a crafted folder runs code through
either. Here the metadata is unpickled admitting only the classes DCP's metadata is made of (`ALLOWED`, found by
recording what the unpickler is asked for when it reads real checkpoints: lion / AdamW, one process and FSDP2 over
two; tests/train/test_dcp_read.py repeats that check, so a torch that adds a class fails there, not on a user), and
bytes items load with `weights_only=True`. Tensor shards DCP itself reads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from smalto.errors import CheckpointError

METADATA = ".metadata"
ALLOWED = {
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum: a member by value
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, offset, length of each item
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by name (a dictionary lookup)
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}
# and dtypes (bf16 checkpoints store torch.bfloat16) and layouts, as attributes of `torch`: `_torch_constant`


def _torch_constant(module: str, name: str) -> bool:
    """A dtype or layout (`torch.bfloat16`, `torch.strided`), as pickle names them. Memory formats are stored as
    `_MEM_FORMAT_ENCODING` members (they cannot be pickled)."""
    value = getattr(torch, name, None) if module == "torch" else None
    return isinstance(value, (torch.dtype, torch.layout))


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED or _torch_constant(module, name):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source} holds a non-checkpoint object ({module}.{name}), so the checkpoint was not loaded: "
            "a DCP checkpoint's metadata holds only DCP's own records; this one was made to run code, or by a "
            "torch that smalto does not know yet"
        )


def read_metadata(folder: str | Path) -> Metadata:
    """The DCP metadata of a checkpoint folder, read with the restricted unpickler; a CheckpointError says why not."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no {METADATA}: not a complete DCP checkpoint")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # truncated or garbled: pickle raises many kinds
            raise CheckpointError(f"{path} is not DCP metadata smalto can read ({e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; not loaded")
    for info in (metadata.storage_data or {}).values():  # every shard file inside the folder
        rel = PurePosixPath(str(getattr(info, "relative_path", "")))
        if not rel.parts or rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{path} names a data file outside its folder ({rel}); not loaded")
    return metadata


class _Reader(FileSystemReader):
    """A FileSystemReader that hands DCP the metadata `read_metadata` already read safely."""

    def __init__(self, folder: str | Path, metadata: Metadata):
        super().__init__(folder)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        meta = getattr(self._metadata, "storage_meta", None) or StorageMeta()
        meta.load_id = self.load_id
        self._metadata.storage_meta = meta
        return self._metadata


class _Planner(DefaultLoadPlanner):
    """DCP's default planner, with non-tensor items (optimizer hyperparameters) read with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"the checkpoint's item {fqn} holds a non-checkpoint object, so it was not loaded ({e})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load_dcp(state: dict[str, Any], folder: str | Path) -> None:
    """`dcp.load(state, checkpoint_id=folder)` that runs no code from the folder. A CheckpointError raised while
    DCP reads (which DCP wraps in its own exception) comes out as itself; other failures pass on unchanged."""
    metadata = read_metadata(folder)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # one process: "assuming the intent is to load in a single..."
        try:
            dcp.load(state, storage_reader=_Reader(folder, metadata), planner=_Planner())
        except CheckpointException as e:
            for exc, _ in e.failures.values():
                if isinstance(exc, CheckpointError):
                    raise exc from None
            raise


def dcp_cause(e: BaseException) -> str:
    """One line for a failed DCP call: the first exception it wraps (its own str is a traceback per rank)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
