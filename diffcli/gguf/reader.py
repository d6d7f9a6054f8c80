"""Open a GGUF file: memory-mapped, zero-copy, tensors looked up by name.

GGUF layout (little endian): magic `GGUF`, u32 version (2 or 3), u64 tensor count, u64 key/value
count, the key/value pairs, the tensor infos (name, dims fastest-first, ggml type, offset), padding
to `general.alignment` (default 32), then the tensor data.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds Python objects for
every part of every array element, which costs ~10 s for a 262k-token vocabulary plus 515k merges
(the real files carry both). Type ids and block sizes come from the `gguf` package, and
tests/test_gguffile.py checks this parser against `GGUFReader` on the real Gemma 3 file.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import InputError
from .qtensor import QTensor

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class _Truncated(Exception):
    pass


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class _Cursor:
    """Reads header values from the mapped bytes; every read is bounds-checked.

    Works on a memoryview with `struct`, not on numpy slices: a 262k-entry string array is one
    tight loop of `unpack_from` + `str()`, about 20x faster than slicing an array per element."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise _Truncated
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        if self.pos + 4 > self.end:
            raise _Truncated
        self.pos += 4
        return _U32.unpack_from(self.buf, self.pos - 4)[0]

    def u64(self) -> int:
        if self.pos + 8 > self.end:
            raise _Truncated
        self.pos += 8
        return _U64.unpack_from(self.buf, self.pos - 8)[0]

    def string(self) -> str:
        return str(self.take(self.u64()), "utf-8", "replace")

    def strings(self, count: int) -> list[str]:
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > end:
                raise _Truncated
            append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            itype, count = GGUFValueType(self.u32()), self.u64()
            if itype == GGUFValueType.STRING:
                return self.strings(count)
            if itype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY) for _ in range(count)]
            dt = np.dtype(_SCALAR[itype])
            arr = np.frombuffer(self.take(count * dt.itemsize), dtype=dt)
            return [bool(x) for x in arr] if itype == GGUFValueType.BOOL else arr.tolist()
        dt = np.dtype(_SCALAR[vtype])
        x = np.frombuffer(self.take(dt.itemsize), dtype=dt)[0]
        return bool(x) if vtype == GGUFValueType.BOOL else x.item()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_dims: tuple[int, ...]   # fastest-varying first, as stored
    qtype: str
    offset: int                  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order: the GGUF dims reversed (a GGUF [in, out] is an nn.Linear weight [out, in])."""
        return tuple(reversed(self.ggml_dims))


class GGUFFile:
    """A parsed GGUF file. `metadata` maps key -> Python value; tensor data stays in the mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError("no such file", path=self.path, fix="check the path of the .gguf file")
        if self.path.is_dir():
            raise InputError("is a directory, not a GGUF file", path=self.path,
                             fix="pass the .gguf file inside it")
        size = self.path.stat().st_size
        if size < 24:
            raise InputError(f"file is too small to be a GGUF file ({size} bytes)", path=self.path,
                             fix="check the path, or download the model again")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise InputError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')",
                             path=self.path, fix="pass a .gguf model file (llama.cpp format)")
        # Copy-on-write mapping: writable for torch.from_numpy, but pages are never copied since
        # nothing writes to them.
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        try:
            self._parse(size)
        except _Truncated:
            raise InputError("file is truncated: its header ends before all metadata was read",
                             path=self.path, fix="the download is incomplete; download it again") from None
        except ValueError as exc:  # unknown value type id in the header
            raise InputError(f"corrupt GGUF header ({exc})", path=self.path,
                             fix="the file is damaged; download it again") from None

    def _parse(self, size: int) -> None:
        cur = _Cursor(memoryview(self._map))
        cur.take(4)
        self.version = cur.u32()
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version > 0xFFFF else ""
            raise InputError(f"unsupported GGUF version {self.version}{hint}", path=self.path,
                             fix="convert the model again with a current llama.cpp / gguf-py")
        n_tensors, n_kv = cur.u64(), cur.u64()
        if n_tensors > 10_000_000 or n_kv > 10_000_000:
            raise InputError("corrupt GGUF header (absurd tensor or key count)", path=self.path,
                             fix="the file is damaged; download it again")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, GGUFValueType] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.u32()
            self.value_types[key] = GGUFValueType(vtype)
            self.metadata[key] = cur.value(vtype)
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if n_dims > 8:
                raise InputError(f"corrupt tensor info for {name!r} ({n_dims} dims)", path=self.path,
                                 fix="the file is damaged; download it again")
            dims = tuple(cur.u64() for _ in range(n_dims))
            type_id, offset = cur.u32(), cur.u64()
            raw_infos.append((name, dims, type_id, offset))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise InputError(f"general.alignment is {align!r}, not a power of two", path=self.path,
                             fix="the file is damaged; convert it again")
        self.data_offset = (cur.pos + align - 1) // align * align
        self._infos: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in raw_infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise InputError(f"tensor {name!r} has unknown ggml type id {type_id}", path=self.path,
                                 fix="this file needs a newer runtime; re-quantize it to Q4_K_M or Q8_0") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_el = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if dims and dims[0] % block:
                raise InputError(f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                                 f"{qtype.name} block size {block}", path=self.path,
                                 fix="the file is damaged; download it again")
            info = TensorInfo(name, dims, qtype.name, self.data_offset + offset,
                              n_el // block * type_size)
            if info.offset + info.nbytes > size:
                raise InputError(f"tensor {name!r} data runs past the end of the file "
                                 f"(needs byte {info.offset + info.nbytes:,}, file has {size:,})",
                                 path=self.path, fix="the download is incomplete; download it again")
            if name in self._infos:
                raise InputError(f"tensor {name!r} appears twice", path=self.path,
                                 fix="the file is damaged; convert it again")
            self._infos[name] = info

    # -- public surface ---------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise InputError(f"tensor {name!r} is missing", path=self.path,
                             fix="the file is incomplete or for another model; convert it again") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def tensor(self, name: str) -> QTensor:
        """The tensor's raw bytes as a zero-copy uint8 view, wrapped as a QTensor (torch shape)."""
        info = self.info(name)
        raw = torch.from_numpy(self._map[info.offset:info.offset + info.nbytes])
        return QTensor(raw, info.qtype, info.shape, name=name)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self._infos)})"


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped). Raises `InputError` with a one-line message on bad input."""
    return GGUFFile(path)
