"""The one GGUF (llama.cpp) file reader: metadata key/values and the tensor directory.

Both the tokenizer (`Tokenizer.from_gguf`, which needs only `tokenizer.*` metadata) and the weights
loader (`weights/gguf.py`, which needs everything) read GGUF files through this module; it sits low
in the import order (numpy only) so that neither has to import the other.

`gguf.GGUFReader` would also work but builds a numpy view for every element of every metadata array
(262k vocabulary strings in a Gemma 3 file: ~13 s); this walks the header once (~1 s). Tensor data
stays memory-mapped; dequantizing is the `gguf` package's job (`gguf.quants.dequantize`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the contiguous (innermost) one
    qtype: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # raw bytes, [*reversed(dims[1:]), row_bytes] uint8 (a view of the file)


class _Header:
    """A cursor over a memory-mapped little-endian GGUF v2/v3 file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.raw = memoryview(self.buf)
        if bytes(self.raw[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, self.n_tensors, self.n_kv = struct.unpack_from("<IQQ", self.raw, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian file?)")
        self.pos = 24

    def unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return bytes(self.raw[self.pos - n: self.pos]).decode("utf-8")

    def value(self, kind: int, keep: bool) -> Any:
        """The next value of type `kind`; when not `keep`, it is skipped (None) without decoding."""
        if kind == _STRING:
            if keep:
                return self.string()
            n = self.unpack("<Q")  # (not `self.pos += self.unpack(...)`: that would lose the 8 bytes read)
            self.pos += n
            return None
        if kind == _ARRAY:
            elem, count = self.unpack("<IQ")
            if elem in (_STRING, _ARRAY):
                items = [self.value(elem, keep) for _ in range(count)]
                return items if keep else None
            dtype = np.dtype(_NUMPY[elem])
            out = np.frombuffer(self.raw, dtype, count, self.pos).copy() if keep else None
            self.pos += dtype.itemsize * count
            return out
        return self.unpack(_SCALARS[kind])

    def metadata(self, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _ in range(self.n_kv):
            key = self.string()
            keep = key.startswith(prefix)
            value = self.value(self.unpack("<I"), keep)
            if keep:
                out[key] = value
        return out


def read_metadata(path: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """The key/value metadata of a GGUF file whose key starts with `prefix` (others are skipped).

    Strings come back as `str`, numeric arrays as numpy arrays, string arrays as lists of `str`.
    Tensor infos and data are not read.
    """
    return _Header(path).metadata(prefix)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(all metadata, tensors) of a GGUF file; tensor data stays memory-mapped."""
    import gguf

    header = _Header(path)
    metadata = header.metadata("")
    infos = []
    for _ in range(header.n_tensors):
        name = header.string()
        n_dims = header.unpack("<I")
        dims = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}Q", header.raw, header.pos))
        header.pos += 8 * n_dims
        qtype, offset = header.unpack("<IQ")
        infos.append((name, dims, qtype, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-header.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        if dims[0] % block:
            raise ValueError(f"GGUF tensor {name}: row of {dims[0]} is not whole blocks of {block}")
        row_bytes = dims[0] // block * type_size
        shape = (*reversed(dims[1:]), row_bytes)
        begin = data_start + offset
        data = header.buf[begin: begin + math.prod(shape)].reshape(shape)
        tensors.append(GGUFTensor(name, dims, qtype, data))
    return metadata, tensors
