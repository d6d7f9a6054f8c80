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

import ctypes
import mmap
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
_VALUE_TYPES = {int(t): t for t in GGUFValueType}

# Limits on what a header may claim, checked before anything is allocated. The real files carry
# ~40 keys, ~750 tensors and arrays of 262,144 tokens / 514,906 merges (1.3M elements in all).
MAX_KEY_BYTES = 65_535          # GGUF spec: keys are at most 2^16 - 1 bytes
MAX_NAME_BYTES = 64             # GGUF spec / ggml GGML_MAX_NAME: tensor names
MAX_DIMS = 4                    # ggml GGML_MAX_DIMS
MAX_ARRAY = 1 << 21             # elements in one metadata array (8x the largest real one)
MAX_ELEMENTS = 1 << 22          # array elements in the whole header
MAX_NESTING = 4                 # arrays of arrays
MAX_KEYS = 1 << 20
MAX_TENSORS = 1 << 20
INT64_MAX = (1 << 63) - 1       # ggml counts elements and bytes in int64


class _Bad(Exception):
    """A header problem: `what` is the field, `at` its byte offset. `truncated` when the file
    evidently ends early (rather than a length field being corrupt)."""

    def __init__(self, what: str, at: int, detail: str, truncated: bool = False):
        super().__init__(what)
        self.what, self.at, self.detail, self.truncated = what, at, detail, truncated


def show(text: str, limit: int = 60) -> str:
    """A name or token for a one-line message: quoted, control characters escaped, shortened."""
    out = repr(text[:limit])
    return out[:-1] + "..." + out[-1] if len(text) > limit else out


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _looks_like_text(b: memoryview) -> bool:
    """Bytes a truncated string would leave at the end of the file: UTF-8 text (possibly cut
    inside its last character) without NULs. A corrupt length in a complete file instead runs
    over the following binary fields and tensor data."""
    raw = bytes(b)
    if b"\x00" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(raw) - 3 and exc.reason == "unexpected end of data"
    return True


def _bytes(n: int) -> str:
    return f"{n:,} byte" if n == 1 else f"{n:,} bytes"


def _left(n: int) -> str:
    """'only 3 bytes are left', 'only 1 byte is left', 'no bytes are left'."""
    return "no bytes are left" if n == 0 else f"only {_bytes(n)} {'is' if n == 1 else 'are'} left"


class _Cursor:
    """Reads header values from the mapped bytes; every read is bounds-checked and every count
    is checked against the bytes left before anything is allocated.

    Works on a memoryview with `struct`, not on numpy slices: a 262k-entry string array is one
    tight loop of `unpack_from` + `str()`, about 20x faster than slicing an array per element."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos, self.end = buf, 0, len(buf)
        self.elements = 0

    def left(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.end:
            raise _Bad(what, self.pos, f"needs {_bytes(n)}, but {_left(self.left())}", truncated=True)

    def u32(self, what: str) -> int:
        self._need(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, self.pos - 4)[0]

    def u64(self, what: str) -> int:
        self._need(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, self.pos - 8)[0]

    def _string_at(self, pos: int, n: int, what: str, limit: int | None) -> None:
        """Raise for a string of claimed length `n` whose bytes start at `pos`, if it cannot be."""
        if limit is not None and n > limit:
            raise _Bad(what, pos - 8, f"has length {n:,}, more than the {limit:,} bytes allowed")
        if pos + n > self.end:
            tail = self.buf[pos:self.end]
            if n <= 1 << 26 and _looks_like_text(tail):
                # counted from the field's start, its 8-byte length included, as `at` is
                raise _Bad(what, pos - 8, f"needs {_bytes(n + 8)}, but {_left(self.end - pos + 8)}",
                           truncated=True)
            raise _Bad(what, pos - 8, f"has length {n:,}, but {_left(self.end - pos)} in the file")

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(what)
        self._string_at(self.pos, n, what, limit)
        out = str(self.buf[self.pos:self.pos + n], "utf-8", "replace")
        self.pos += n
        return out

    def _count(self, count: int, what: str, at: int) -> None:
        if count > MAX_ARRAY:
            raise _Bad(what, at, f"claims {count:,} elements, more than the {MAX_ARRAY:,} an "
                       "array may have")
        self.elements += count
        if self.elements > MAX_ELEMENTS:
            raise _Bad(what, at, f"claims {count:,} elements, which makes more than "
                       f"{MAX_ELEMENTS:,} array elements in the header")

    def strings(self, count: int, what: str) -> list[str]:
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        append = out.append
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self._need(8, f"{what} element {i}")
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > end:
                self._string_at(pos, n, f"{what} element {i}", None)
            append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        code = self.u32(what)
        vtype = _VALUE_TYPES.get(code)
        if vtype is None:
            raise _Bad(what, at, f"has value type {code}, which is not a GGUF type (0 to "
                       f"{max(_VALUE_TYPES)})")
        return vtype

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise _Bad(what, self.pos, f"nests arrays more than {MAX_NESTING} deep")
            itype = self.value_type(f"{what} (element type)")
            at = self.pos
            count = self.u64(f"{what} (element count)")
            self._count(count, what, at)
            if itype == GGUFValueType.STRING:
                return self.strings(count, what)
            if itype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY, f"{what} element {i}", depth + 1)
                        for i in range(count)]
            dt = np.dtype(_SCALAR[itype])
            if count * dt.itemsize > self.left():
                raise _Bad(what, at, f"claims {count:,} {itype.name} elements ({count * dt.itemsize:,} "
                           f"bytes), but only {self.left():,} bytes are left in the file")
            arr = np.frombuffer(self.buf[self.pos:self.pos + count * dt.itemsize], dtype=dt)
            self.pos += count * dt.itemsize
            return [bool(x) for x in arr] if itype == GGUFValueType.BOOL else arr.tolist()
        dt = np.dtype(_SCALAR[vtype])
        self._need(dt.itemsize, what)
        x = np.frombuffer(self.buf[self.pos:self.pos + dt.itemsize], dtype=dt)[0]
        self.pos += dt.itemsize
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
        except _Bad as bad:
            if bad.truncated:
                raise InputError(f"file is truncated: it ends at byte {size:,}, inside {bad.what} "
                                 f"(at byte {bad.at:,}), which {bad.detail}", path=self.path,
                                 fix="the download is incomplete; download it again") from None
            raise InputError(f"corrupt GGUF header: {bad.what} at byte {bad.at:,} {bad.detail}",
                             path=self.path, fix="the file is damaged; download it again") from None

    def _parse(self, size: int) -> None:
        cur = _Cursor(memoryview(self._map))
        cur.pos = 4
        self.version = cur.u32("the version")
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version > 0xFFFF else ""
            raise InputError(f"unsupported GGUF version {self.version}{hint}", path=self.path,
                             fix="convert the model again with a current llama.cpp / gguf-py")
        n_tensors, n_kv = cur.u64("the tensor count"), cur.u64("the key count")
        # no allocation depends on these counts: the loops below read one key / tensor info at a
        # time, each at least 13 / 24 bytes of the file, so the end of the file stops them
        if n_kv > MAX_KEYS:
            raise _Bad("the key count", 16, f"is {n_kv:,}, more than the {MAX_KEYS:,} a file may have")
        if n_tensors > MAX_TENSORS:
            raise _Bad("the tensor count", 8, f"is {n_tensors:,}, more than the {MAX_TENSORS:,} a "
                       "file may have")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            at = cur.pos
            key = cur.string(f"key {i}", MAX_KEY_BYTES)
            if key in self.metadata:
                raise _Bad(f"key {i}", at, f"repeats the key {show(key)}")
            what = f"the value of {show(key)}"
            vtype = cur.value_type(what)
            self.value_types[key] = vtype
            self.metadata[key] = cur.value(vtype, what)
        raw_infos = []
        for i in range(n_tensors):
            at = cur.pos
            name = cur.string(f"the name of tensor {i}", MAX_NAME_BYTES)
            what = f"tensor {show(name)}"
            dims_at = cur.pos
            n_dims = cur.u32(f"{what} (dim count)")
            if n_dims > MAX_DIMS:
                raise _Bad(f"{what} (dim count)", dims_at, f"is {n_dims}, more than {MAX_DIMS}")
            dims = tuple(cur.u64(f"{what} (dims)") for _ in range(n_dims))
            type_at = cur.pos
            type_id = cur.u32(f"{what} (type)")
            offset = cur.u64(f"{what} (offset)")
            raw_infos.append((name, dims, type_id, offset, at, dims_at, type_at))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(align) is not int or align <= 0 or align & (align - 1):
            raise InputError(f"general.alignment is {align!r}, not a power of two", path=self.path,
                             fix="the file is damaged; convert it again")
        self.data_offset = (cur.pos + align - 1) // align * align
        self._infos: dict[str, TensorInfo] = {}
        expected = 0                 # where the next tensor starts: llama.cpp's rule
        for name, dims, type_id, offset, at, dims_at, type_at in raw_infos:
            what = f"tensor {show(name)}"
            if name in self._infos:
                raise _Bad(f"the name of tensor {len(self._infos)}", at,
                           f"repeats the tensor name {show(name)}")
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise InputError(f"{what} has unknown ggml type id {type_id}", path=self.path,
                                 fix="this file needs a newer runtime; re-quantize it to Q4_K_M or Q8_0") from None
            n_el = 1
            for d in dims:           # exact integers: a wrapping int64 product could pass as 0
                n_el *= d
            if any(d > INT64_MAX for d in dims) or n_el > INT64_MAX:
                raise _Bad(f"{what} (dims)", dims_at, f"are {list(dims)}: {n_el:,} elements do "
                           "not fit in 64 bits")
            if dims and dims[0] % block:
                raise InputError(f"{what}: row length {dims[0]} is not a multiple of the "
                                 f"{qtype.name} block size {block}", path=self.path,
                                 fix="the file is damaged; download it again")
            nbytes = n_el // block * type_size
            if offset != expected:
                why = (f"not a multiple of the alignment {align}" if offset % align else
                       "tensors must follow each other in the order listed, each padded to "
                       f"{align} bytes")
                raise InputError(f"{what} has data offset {offset:,}, expected {expected:,} "
                                 f"({why})", path=self.path,
                                 fix="the file is damaged; download or convert it again")
            info = TensorInfo(name, dims, qtype.name, self.data_offset + offset, nbytes)
            if info.offset + nbytes > size:
                raise InputError(f"{what} data runs past the end of the file "
                                 f"(needs byte {info.offset + nbytes:,}, file has {size:,})",
                                 path=self.path, fix="the download is incomplete; download it again")
            self._infos[name] = info
            expected = offset + (nbytes + align - 1) // align * align

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

    def prefetch(self) -> bool:
        """Ask the OS to read the whole file ahead into its page cache (madvise WILLNEED), as
        llama.cpp does for its mappings: the weights then come in one sequential read in the
        background, instead of page by page from disk when a prompt first routes to them (a
        6-layer file's first 2k-token prefill ran at 70 tok/s from disk, 275 from the cache).
        Nothing is mapped into the process by it. Skipped where the file would not fit in the
        memory the OS reports available. True if the OS took the advice."""
        advice, avail = getattr(mmap, "MADV_WILLNEED", None), available_ram()
        if advice is None or (avail is not None and self._map.size > 0.9 * avail):
            return False
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            return False
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        return madvise(self._map.ctypes.data, self._map.size, advice) == 0

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self._infos)})"


def available_ram() -> int | None:
    """Bytes of memory the OS says are available (Linux MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped). Raises `InputError` with a one-line message on bad input."""
    return GGUFFile(path)
