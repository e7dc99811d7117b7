"""Read tensors, or boxes of them, from a dist checkpoint with torch DCP alone.

No process group, no megatron-core, no writer process: export tools and the sampler read a
checkpoint in a plain Python process. Whatever layout saved a tensor, a read returns the requested
box of the global tensor assembled from the stored shards; only the stored items that overlap the
box are read, so memory stays bounded by what is asked for. A box that is exactly one stored item
(the common case when reading HF tensors from a checkpoint saved at TP=1) is returned as loaded,
without a second buffer; items with DCP stream transforms fall back to torch DCP's own reader.
"""

import bisect
import math
import os
import warnings
from collections.abc import Sequence

import torch
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from megadiff.errors import CheckpointError
from megadiff.platform.compat import dcp_file_view

from .bytecopy.dcp_records import record_data_offset
from .format import DCP_METADATA_NAME
from .untrusted import SafeFileSystemReader, vet_checkpoint

Box = tuple[str, Sequence[int] | None, Sequence[int] | None]  # key, offsets, sizes (None = all)


class _Boxes(torch.Tensor):
    """Read targets of one global tensor: buffers at given offsets (DCP _Checkpointable protocol)."""

    @staticmethod
    def __new__(cls, global_shape, dtype, boxes):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=dtype, device="cpu")

    def __init__(self, global_shape, dtype, boxes: list[tuple[tuple[int, ...], torch.Tensor]]):
        self._boxes = boxes

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"_Boxes is a read target, not a tensor ({func})")

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=b.shape) for o, b in self._boxes]

    def __get_tensor_shard__(self, index):
        for offsets, buffer in self._boxes:
            if torch.Size(offsets) == index.offset:
                return buffer
        raise ValueError(f"no read target at offset {list(index.offset)}")


class DistCheckpointReader:
    """Tensor keys, global shapes, dtypes and values of a megatron-core torch_dist checkpoint dir.

    The constructor checks that every data file the metadata refers to lies inside the checkpoint
    dir, exists and is long enough, and that no tensor claims more bytes than its record holds
    (untrusted.check_data_files), so a truncated or missing `.distcp` file, or a link out of the
    dir, is reported before any conversion starts. Unless
    `trust`, `.metadata` is unpickled with an allow-list and a checkpoint whose byte items hold
    more than tensors is refused (megadiff.checkpoint.untrusted); only tensors are ever read, with
    torch's weights-only unpickler.

    `plain`: every read goes through torch DCP's public `load` (no record parsed by hand, no
    `data_location`): the converters' `--io plain`. Otherwise plain torch.save records (what
    megatron-core and torch write by default) are loaded directly, a record at a time."""

    def __init__(self, ckpt_dir: str, trust: bool = False, plain: bool = False):
        self.ckpt_dir = ckpt_dir
        if not os.path.isfile(os.path.join(ckpt_dir, DCP_METADATA_NAME)):
            raise CheckpointError(f"{ckpt_dir}: {DCP_METADATA_NAME} missing; not a dist_checkpointing directory")
        self._reader = SafeFileSystemReader(ckpt_dir, trust=trust)
        metadata = self._reader.read_metadata()  # CheckpointError naming the file if refused / unreadable
        self._tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._chunk_at = {  # key -> {chunk offsets: chunk sizes}
            k: {tuple(c.offsets): tuple(c.sizes) for c in v.chunks} for k, v in self._tensors.items()
        }
        self._by_lead: dict[str, tuple] = {}  # key -> chunks grouped by dim-0 offset
        self._storage = metadata.storage_data or {}
        self._data_at: dict[MetadataIndex, tuple[str, int] | None] = {}
        # Items written as plain torch.save records (what megatron-core and torch write by default)
        # are read directly; anything with stream transforms goes through torch DCP's reader.
        self._direct = not plain and all(not getattr(i, "transform_descriptors", None) for i in self._storage.values())
        # read_metadata checked every data file: inside the dir, present, long enough, not claiming
        # more bytes than stored (untrusted.check_data_files)
        vet_checkpoint(ckpt_dir, trust, metadata, extra_state_is_loaded=False)  # byte items: no code

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key).properties.dtype

    def _meta(self, key: str) -> TensorStorageMetadata:
        if key not in self._tensors:
            raise CheckpointError(f"{self.ckpt_dir}: tensor '{key}' is not in the checkpoint")
        return self._tensors[key]

    def _chunks_overlapping(self, key: str, offsets, sizes) -> list:
        """The stored chunks that may overlap the box: those of the dim-0 groups whose range meets
        the box's (a stack of 256 experts has 256 chunks; testing each one in Python for every
        box made reading a checkpoint quadratic in the number of experts)."""
        if key not in self._by_lead:
            groups: dict[int, list] = {}
            for chunk in self._meta(key).chunks:
                groups.setdefault(chunk.offsets[0] if len(chunk.offsets) else 0, []).append(chunk)
            leads = sorted(groups)
            ends = [max(c.offsets[0] + c.sizes[0] if len(c.offsets) else 1 for c in groups[lead]) for lead in leads]
            self._by_lead[key] = (leads, ends, [groups[lead] for lead in leads])
        leads, ends, groups = self._by_lead[key]
        if not offsets:
            return [c for g in groups for c in g]
        last = bisect.bisect_left(leads, offsets[0] + sizes[0])
        return [c for i in range(last) if ends[i] > offsets[0] for c in groups[i]]

    def _check_covered(self, key, offsets, sizes) -> None:
        """Stored chunks never overlap (DCP validates that on save), so the box is fully stored iff
        the volumes of its overlaps with them add up to its own volume."""
        covered = 0
        for chunk in self._chunks_overlapping(key, offsets, sizes):
            volume = 1
            for o, s, co, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True):
                volume *= max(0, min(o + s, co + cs) - max(o, co))
            covered += volume
        wanted = 1
        for s in sizes:
            wanted *= s
        if covered != wanted:
            raise CheckpointError(
                f"{self.ckpt_dir}: tensor '{key}' is only partly stored ({covered} of {wanted} elements "
                f"of the box at {list(offsets)}); the checkpoint is incomplete"
            )

    def _box(self, key, offsets, sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = self.shape(key)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else tuple(s - o for s, o in zip(shape, offsets, strict=True))
        if len(offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
            raise ValueError(f"{key}: box at {list(offsets)} of size {list(sizes)} outside {list(shape)}")
        if self._chunk_at.get(key, {}).get(offsets) != sizes:  # exactly one stored item: covered
            self._check_covered(key, offsets, sizes)
        return offsets, sizes

    def read_many(self, boxes: Sequence[Box]) -> list[torch.Tensor]:
        """Read boxes (key, offsets, sizes; None = the whole tensor); one tensor per box, in order."""
        boxes = [(key, *self._box(key, offsets, sizes)) for key, offsets, sizes in boxes]
        if self._direct:
            return [self._read_direct(*box) for box in boxes]
        return self._read_with_dcp(boxes)

    def _read_direct(self, key, offsets, sizes) -> torch.Tensor:
        """Load the stored items overlapping the box; a box that is exactly one stored item is
        returned as loaded (no second buffer, no copy), the general case is assembled."""
        if self._chunk_at[key].get(offsets) == sizes:
            return self._load_item(key, ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        parts = self._overlaps(key, offsets, sizes)
        if len(parts) == 1 and tuple(parts[0][0].offsets) == offsets and tuple(parts[0][0].sizes) == sizes:
            return self._load_item(key, parts[0][0])
        out = torch.empty(sizes, dtype=self.dtype(key))
        for chunk, src, dst in parts:
            stored = self._load_item(key, chunk)
            out[dst].copy_(stored[src])
            del stored
        return out

    def _overlaps(self, key: str, offsets, sizes) -> list[tuple[ChunkStorageMetadata, tuple, tuple]]:
        """(stored chunk, its slices, the box's slices) for every chunk overlapping the box."""
        parts = []
        for chunk in self._chunks_overlapping(key, offsets, sizes):
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)]
            if all(h > low for h, low in zip(hi, lo, strict=True)):
                src = tuple(slice(low - c, h - c) for low, h, c in zip(lo, hi, chunk.offsets, strict=True))
                dst = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offsets, strict=True))
                parts.append((chunk, src, dst))
        return parts

    def _load_item(self, key: str, chunk) -> torch.Tensor:
        info = self._storage.get(MetadataIndex(key, torch.Size(chunk.offsets)))
        if info is None:
            raise CheckpointError(f"{self.ckpt_dir}: '{key}' at {list(chunk.offsets)} has no stored data")
        path = os.path.join(self.ckpt_dir, info.relative_path)
        try:
            with open(path, "rb") as f:
                tensor = torch.load(dcp_file_view(f, info.offset, info.length), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: '{key}' at {list(chunk.offsets)} could not be read ({e!r})") from None
        if tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != self.dtype(key):
            raise CheckpointError(
                f"{path}: '{key}' at {list(chunk.offsets)} holds {tensor.dtype} "
                f"{list(tensor.shape)}, the metadata says {self.dtype(key)} {list(chunk.sizes)}"
            )
        return tensor

    def _read_with_dcp(self, boxes) -> list[torch.Tensor]:
        """torch DCP's own reader (used when items are stored with stream transforms)."""
        targets: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        out = []
        for key, offsets, sizes in boxes:
            if any(o == offsets for o, _ in targets.get(key, [])):
                raise ValueError(f"{key}: two boxes at offset {list(offsets)} in one read")
            buffer = torch.empty(sizes, dtype=self.dtype(key))
            targets.setdefault(key, []).append((offsets, buffer))
            out.append(buffer)
        state = {key: _Boxes(self.shape(key), self.dtype(key), items) for key, items in targets.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                torch.distributed.checkpoint.load(
                    state,
                    storage_reader=self._reader,
                    planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                    no_dist=True,
                )
        except CheckpointException as e:
            causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            if any(isinstance(c, KeyboardInterrupt) for c in causes):
                raise KeyboardInterrupt from e
            raise CheckpointError(f"{self.ckpt_dir}: reading {sorted(targets)[:3]} failed ({causes[0]!r})") from None
        except Exception as e:
            raise CheckpointError(f"{self.ckpt_dir}: reading {sorted(targets)[:3]} failed ({e!r})") from None
        return out

    # ---- where stored bytes are (for converters that copy them file to file) ----------------

    def data_location(self, key: str, chunk_offsets: Sequence[int]) -> tuple[str, int] | None:
        """(file path, absolute offset) of the raw bytes of the item stored at `chunk_offsets`, in
        C order, when the item is a plain torch.save record of a contiguous tensor (what DCP and
        megatron-core write); None otherwise (then read it). Reads only the record's metadata."""
        index = MetadataIndex(key, torch.Size(chunk_offsets))
        if index not in self._data_at:
            self._data_at[index] = self._find_data(key, index) if self._direct else None
        return self._data_at[index]

    def read_ahead_record_metadata(self, window: int = 8192) -> None:
        """Ask the kernel to read every stored record's head and tail (zip headers, pickle: what
        `data_location` parses) now, all at once: parsed one by one from a cold disk they were
        1.3 s of a 3.7 s export of 3 GB here (thousands of small synchronous reads)."""
        if not hasattr(os, "posix_fadvise"):
            return
        files: dict[str, int] = {}
        try:
            for info in self._storage.values():
                path = os.path.join(self.ckpt_dir, info.relative_path)
                if path not in files:
                    files[path] = os.open(path, os.O_RDONLY)
                for start in (info.offset, max(info.offset, info.offset + info.length - window)):
                    os.posix_fadvise(files[path], start, window, os.POSIX_FADV_WILLNEED)
        finally:
            for fd in files.values():
                os.close(fd)

    def _find_data(self, key: str, index: MetadataIndex) -> tuple[str, int] | None:
        info = self._storage.get(index)
        if info is None:
            return None
        path = os.path.join(self.ckpt_dir, info.relative_path)
        found = record_data_offset(path, info.offset, info.length, self.dtype(key))
        return (path, found) if found is not None else None

    def box_row_addresses(self, files, key: str, offsets: Sequence[int], sizes: Sequence[int]):
        """([box rows] int64 byte addresses (byte_spans.FileTable), bytes per row) of a box whose
        rows are contiguous runs in stored items, i.e. every stored item it overlaps holds whole
        rows (the last dim unsplit); None when that is not so (read the box instead)."""
        offsets, sizes = self._box(key, offsets, sizes)
        shape = self.shape(key)
        if len(shape) < 2 or offsets[-1] != 0 or sizes[-1] != shape[-1]:
            return None
        row_bytes = shape[-1] * torch.empty((), dtype=self.dtype(key)).element_size()
        out = torch.empty(sizes[:-1], dtype=torch.int64)
        for chunk, src, dst in self._overlaps(key, offsets, sizes):
            location = self.data_location(key, chunk.offsets)
            if location is None or chunk.sizes[-1] != shape[-1]:
                return None
            rows = math.prod(chunk.sizes[:-1])
            stored = files.row_addresses(location[0], location[1], rows, row_bytes).reshape(tuple(chunk.sizes[:-1]))
            out[dst[:-1]] = stored[src[:-1]]
        return out, row_bytes

    def read(self, key: str, offsets: Sequence[int] | None = None, sizes: Sequence[int] | None = None) -> torch.Tensor:
        return self.read_many([(key, offsets, sizes)])[0]
