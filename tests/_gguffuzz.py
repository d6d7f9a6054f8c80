"""GGUF files taken apart and put back together, for tests that damage them on purpose.

`Gguf.parse(data)` splits a well-formed file into its key/values (raw value bytes kept), tensor
infos and data section; `.to_bytes()` writes it again (header, padding to the alignment, the
data section unchanged), so a key can be replaced by a value of any type, dims or offsets
edited, and the result is still a file whose tensor offsets point where they pointed.
`fields(data)` lists every header field of a well-formed file (byte offset, size, kind, label):
what the fuzzer aims its byte-level mutations at.

Written for the tests (not a general GGUF writer): little endian, GGUF v2/v3.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
        U64: "Q", I64: "q", F64: "d"}


def enc_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_value(vtype: int, value, item_type: int | None = None) -> bytes:
    """Bytes of a value of `vtype` (for ARRAY, `item_type` gives the element type)."""
    if vtype == STRING:
        return enc_str(value)
    if vtype == ARRAY:
        out = struct.pack("<IQ", item_type, len(value))
        return out + b"".join(enc_value(item_type, v) for v in value)
    return struct.pack("<" + _FMT[vtype], value)


@dataclass
class KV:
    key: bytes
    vtype: int
    raw: bytes                        # the value's encoding (after the type code)


@dataclass
class TensorInfo:
    name: bytes
    dims: list[int]
    ggml_type: int
    offset: int


@dataclass
class Gguf:
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes                       # the data section (from the aligned start to the end)
    alignment: int = 32
    extra_tensor_count: int = 0       # added to the written tensor count (lie about it)
    extra_kv_count: int = 0

    @classmethod
    def parse(cls, data: bytes) -> "Gguf":
        r = _Reader(data)
        assert data[:4] == b"GGUF"
        r.pos = 4
        version, n_tensors, n_kv = r.u32(), r.u64(), r.u64()
        kvs, align = [], 32
        for _ in range(n_kv):
            key = r.bytes_(r.u64())
            vtype = r.u32()
            start = r.pos
            r.skip_value(vtype)
            kvs.append(KV(key, vtype, data[start:r.pos]))
            if key == b"general.alignment":
                align = struct.unpack_from("<I", data, start)[0]
        tensors = []
        for _ in range(n_tensors):
            name = r.bytes_(r.u64())
            dims = [r.u64() for _ in range(r.u32())]
            tensors.append(TensorInfo(name, dims, r.u32(), r.u64()))
        start = (r.pos + align - 1) // align * align
        return cls(version, kvs, tensors, data[start:], align)

    def to_bytes(self) -> bytes:
        out = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors) + self.extra_tensor_count,
                                    len(self.kvs) + self.extra_kv_count)]
        for kv in self.kvs:
            out += [enc_str(kv.key), struct.pack("<I", kv.vtype), kv.raw]
        for t in self.tensors:
            out += [enc_str(t.name), struct.pack("<I", len(t.dims)),
                    b"".join(struct.pack("<Q", d) for d in t.dims),
                    struct.pack("<IQ", t.ggml_type, t.offset)]
        head = b"".join(out)
        pad = (-len(head)) % self.alignment
        return head + b"\x00" * pad + self.data

    # -- edits ---------------------------------------------------------------------------
    def kv(self, key: str) -> KV:
        return next(kv for kv in self.kvs if kv.key == key.encode())

    def set(self, key: str, vtype: int, value, item_type: int | None = None) -> "Gguf":
        """Set (or add) `key` to a value of any type."""
        raw = enc_value(vtype, value, item_type)
        for kv in self.kvs:
            if kv.key == key.encode():
                kv.vtype, kv.raw = vtype, raw
                return self
        self.kvs.append(KV(key.encode(), vtype, raw))
        return self

    def drop(self, key: str) -> "Gguf":
        self.kvs = [kv for kv in self.kvs if kv.key != key.encode()]
        return self

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name.encode())


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u32(self) -> int:
        self.pos += 4
        return struct.unpack_from("<I", self.data, self.pos - 4)[0]

    def u64(self) -> int:
        self.pos += 8
        return struct.unpack_from("<Q", self.data, self.pos - 8)[0]

    def bytes_(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def skip_value(self, vtype: int) -> None:
        if vtype == STRING:
            self.bytes_(self.u64())
        elif vtype == ARRAY:
            itype, n = self.u32(), self.u64()
            if itype in _FMT:
                self.pos += n * struct.calcsize("<" + _FMT[itype])
            else:
                for _ in range(n):
                    self.skip_value(itype)
        else:
            self.pos += struct.calcsize("<" + _FMT[vtype])


# -- the header as a list of fields, for byte-level mutation ----------------------------------

@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    kind: str          # count | strlen | vtype | ndims | dim | ggml_type | offset | str | scalar | element
    label: str
    vtype: int | None = None


def fields(data: bytes) -> list[Field]:
    """Every field of a well-formed file's header (array elements of long arrays sampled)."""
    out: list[Field] = []
    r = _Reader(data)
    r.pos = 4
    out.append(Field(4, 4, "scalar", "version", U32))
    r.u32()
    out += [Field(8, 8, "count", "tensor count"), Field(16, 8, "count", "key count")]
    n_tensors, n_kv = r.u64(), r.u64()

    def string(label: str) -> None:
        out.append(Field(r.pos, 8, "strlen", label))
        n = r.u64()
        if n:
            out.append(Field(r.pos, n, "str", label))
        r.pos += n

    def value(vtype: int, label: str, depth: int = 0) -> None:
        if vtype == STRING:
            string(label)
        elif vtype == ARRAY:
            out.append(Field(r.pos, 4, "vtype", label + " (element type)"))
            itype = r.u32()
            out.append(Field(r.pos, 8, "count", label + " (count)"))
            n = r.u64()
            for i in range(n):
                if i < 8 or i % 97 == 0 or i == n - 1:
                    value(itype, f"{label}[{i}]", depth + 1)
                elif itype == STRING:
                    r.bytes_(r.u64())
                else:
                    r.skip_value(itype)
        else:
            size = struct.calcsize("<" + _FMT[vtype])
            out.append(Field(r.pos, size, "element" if depth else "scalar", label, vtype))
            r.pos += size

    for i in range(n_kv):
        key_at = r.pos
        n = struct.unpack_from("<Q", data, key_at)[0]
        key = data[key_at + 8:key_at + 8 + n].decode()
        string(f"key {key}")
        out.append(Field(r.pos, 4, "vtype", f"{key} (type)"))
        value(r.u32(), key)
    for i in range(n_tensors):
        n = struct.unpack_from("<Q", data, r.pos)[0]
        name = data[r.pos + 8:r.pos + 8 + n].decode()
        string(f"tensor {name}")
        out.append(Field(r.pos, 4, "ndims", f"{name} (n_dims)"))
        for d in range(r.u32()):
            out.append(Field(r.pos, 8, "dim", f"{name} (dim {d})"))
            r.u64()
        out.append(Field(r.pos, 4, "ggml_type", f"{name} (type)"))
        r.u32()
        out.append(Field(r.pos, 8, "offset", f"{name} (offset)"))
        r.u64()
    return out


def field(data: bytes, kind: str, label: str) -> Field:
    return next(f for f in fields(data) if f.kind == kind and f.label == label)


def patch(data: bytes, f: Field, value: int) -> bytes:
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[f.size]
    return data[:f.offset] + struct.pack(fmt, value % (1 << (8 * f.size))) + data[f.offset + f.size:]


# -- mutators ----------------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 4096,
               65535, 65536, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
NASTY_TEXT = ["", "\n", "\x00", "a\nb", "<bos>", "<|turn>", "\xff", "x" * 70, "general.architecture",
              "diffusion-gemma", "llama", "clip", "▁", " ", "<unk>", "{{", "{% for %}", "\u2028"]
NASTY_BYTES = [b"\xff\xfe", b"\x00\x00", b"\xc3", b"\xed\xa0\x80", b"\n"]
HOSTILE_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% include 'x' %}", "{% import 'x' as y %}", "{% extends 'x' %}",
    "{{ range(10**9)|list }}", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 'x' * 10**10 }}", "{{ 'x'|center(10**10) }}", "{{ ''.__class__.__mro__ }}",
    "{{ 1/0 }}", "{% if %}", "{{ messages[99] }}", "{{ messages[0].content|int }}",
    "{{ raise_exception('no\\nway') }}", "{{ (('x' ~ 'y') * 3000000) ~ 'z' }}",
    "{%- for m in messages -%}{{ m.role }}: {{ m.content }}{%- endfor -%}",
    "{{ '%*s' % (10**10, 'x') }}", "{{ 10 ** 1000000 }}", "{{ [1] * 10**9 }}",
    "{{ tools|tojson(indent=10**9) }}", "{{ '{:>99999999999}'.format(1) }}", "{{ }}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% set a = range(100000)|list %}{% for i in a %}{% for j in a %}{{ i }}{% endfor %}{% endfor %}",
]


def mutate(base: bytes, rng: random.Random, base_fields: list[Field] | None = None) -> tuple[bytes, str]:
    """One mutant of the well-formed file `base` and a description of what was done."""
    flds = base_fields or fields(base)
    roll = rng.random()
    if roll < 0.55:                                    # one to three byte-level field edits
        data, done = base, []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            f = rng.choice(flds)
            data, what = _mutate_field(data, f, rng)
            done.append(what)
        return data, "; ".join(done)
    if roll < 0.85:                                    # structural edits, re-serialized
        return _mutate_structure(base, rng)
    if roll < 0.95:                                    # the file ends early / has junk
        cut = rng.randrange(0, len(base))
        if rng.random() < 0.7:
            return base[:cut], f"truncated at {cut}"
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        return base + junk, f"{len(junk)} bytes appended"
    data = bytearray(base)                             # random bytes anywhere in the header
    end = max(f.offset + f.size for f in flds)
    for _ in range(rng.randrange(1, 8)):
        data[rng.randrange(0, end)] = rng.randrange(256)
    return bytes(data), "random header bytes"


def _mutate_field(data: bytes, f: Field, rng: random.Random) -> tuple[bytes, str]:
    if f.kind == "str":
        b = bytearray(data)
        at = f.offset + rng.randrange(f.size)
        junk = rng.choice(NASTY_BYTES)
        b[at:at + len(junk)] = junk[:f.size - (at - f.offset)]
        return bytes(b[:len(data)]), f"bytes in {f.label}"
    old = int.from_bytes(data[f.offset:f.offset + f.size], "little")
    choice = rng.random()
    if f.kind in ("vtype", "ggml_type") and choice < 0.6:
        new = rng.choice(list(range(0, 40)) + [99, 255, 1 << 31, (1 << 32) - 1])
    elif choice < 0.45:
        new = rng.choice(INTERESTING)
    elif choice < 0.65:
        new = old + rng.choice((-1, 1, -8, 8, 32, -32, 4096))
    elif choice < 0.85:
        new = old ^ (1 << rng.randrange(8 * f.size))
    else:
        new = rng.getrandbits(8 * f.size)
    return patch(data, f, new), f"{f.label} {old} -> {new % (1 << (8 * f.size))}"


def _mutate_structure(base: bytes, rng: random.Random) -> tuple[bytes, str]:
    g = Gguf.parse(base)
    keys = [kv.key.decode() for kv in g.kvs]
    k = rng.randrange(12)
    if k == 0:                                          # a key gets a value of another type
        key = rng.choice(keys)
        vtype = rng.choice((U8, I8, U32, I32, I64, U64, F32, F64, BOOL, STRING, ARRAY))
        value = _value_of(vtype, rng)
        item = rng.choice((U32, I32, STRING, F32, BOOL)) if vtype == ARRAY else None
        if vtype == ARRAY:
            value = [_value_of(item, rng) for _ in range(rng.choice((0, 1, 2, 6, 7, 200)))]
        g.set(key, vtype, value, item)
        return g.to_bytes(), f"{key} = {vtype}:{str(value)[:40]}"
    if k == 1:
        key = rng.choice(keys)
        return g.drop(key).to_bytes(), f"dropped {key}"
    if k == 2 and "tokenizer.ggml.tokens" in keys:      # token list edits
        toks = _strings(g, "tokenizer.ggml.tokens")
        how = rng.randrange(5)
        if how == 0:
            toks[rng.randrange(len(toks))] = rng.choice(NASTY_TEXT)
        elif how == 1:
            toks = [toks[0]] * len(toks)
        elif how == 2:
            toks = toks[:rng.randrange(len(toks))]
        elif how == 3:
            g.set("tokenizer.ggml.tokens", ARRAY, list(range(len(toks))), I32)
            return g.to_bytes(), "tokens are ints"
        else:
            toks += [rng.choice(NASTY_TEXT) for _ in range(3)]
        g.set("tokenizer.ggml.tokens", ARRAY, toks, STRING)
        return g.to_bytes(), f"tokens edit {how}"
    if k == 3 and "tokenizer.ggml.merges" in keys:
        merges = _strings(g, "tokenizer.ggml.merges")
        i = rng.randrange(len(merges))
        merges[i] = rng.choice(["zzz qqq", "a", " ", "", "a  b", merges[i] + "\n", "\x00 \x00",
                                merges[i].replace(" ", "")])
        g.set("tokenizer.ggml.merges", ARRAY, merges, STRING)
        return g.to_bytes(), f"merge {i} = {merges[i]!r}"
    if k == 4:
        tmpl = rng.choice(HOSTILE_TEMPLATES)
        g.set("tokenizer.chat_template", STRING, tmpl)
        return g.to_bytes(), f"template {tmpl[:40]!r}"
    if k == 5:                                          # special token ids
        key = rng.choice(["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                          "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"])
        value = rng.choice([-1, 0, 1, 511, 512, 513, 1 << 20, (1 << 31) - 1])
        g.set(key, I32 if value < 0 else U32, value % (1 << 32) if value >= 0 else value)
        return g.to_bytes(), f"{key} = {value}"
    if k == 6:                                          # an arch key to an edge value
        arch = [x for x in keys if x.startswith("diffusion-gemma.") or x.startswith("diffusion.")]
        key = rng.choice(arch)
        kv = g.kv(key)
        if kv.vtype == ARRAY:
            n = struct.unpack_from("<Q", kv.raw, 4)[0]
            n = max(0, n + rng.choice((-1, 1, 5)))
            g.set(key, ARRAY, [rng.choice((0, 1, 2, 3, 5)) for _ in range(n)],
                  struct.unpack_from("<I", kv.raw)[0] if struct.unpack_from("<I", kv.raw)[0] != STRING else I32)
        elif kv.vtype == F32:
            g.set(key, F32, rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30]))
        else:
            g.set(key, kv.vtype if kv.vtype in (U32, I32, U64) else U32,
                  rng.choice([0, 1, 2, 3, 5, 7, 1 << 16, (1 << 32) - 1]))
        return g.to_bytes(), f"{key} edge value"
    if k == 7 and g.tensors:                            # dims
        t = rng.choice(g.tensors)
        how = rng.randrange(4)
        if how == 0:
            t.dims = [1 << 32, 1 << 32, 4]
        elif how == 1:
            t.dims = t.dims + [rng.choice((1, 2, 1 << 33))]
        elif how == 2:
            t.dims = t.dims[:-1] or [0]
        else:
            t.dims = [d * rng.choice((0, 2)) or 1 for d in t.dims]
        return g.to_bytes(), f"{t.name.decode()} dims {t.dims}"
    if k == 8 and g.tensors:                            # offsets
        t = rng.choice(g.tensors)
        t.offset = max(0, t.offset + rng.choice((-32, 32, 1, -1, 64, 1 << 20, -t.offset)))
        return g.to_bytes(), f"{t.name.decode()} offset {t.offset}"
    if k == 9 and g.tensors:                            # names: duplicates, long, odd text
        t = rng.choice(g.tensors)
        t.name = rng.choice([g.tensors[0].name, b"x" * 65, b"a\nb", b"", b"\xff", b"\x00"])
        return g.to_bytes(), f"tensor renamed {t.name!r}"
    if k == 10:                                         # lie about the counts
        g.extra_tensor_count = rng.choice((1, -1, 1000, 1 << 30))
        if rng.random() < 0.5:
            g.extra_tensor_count, g.extra_kv_count = 0, g.extra_tensor_count
        if len(g.tensors) + g.extra_tensor_count < 0 or len(g.kvs) + g.extra_kv_count < 0:
            g.extra_tensor_count = g.extra_kv_count = 1
        return g.to_bytes(), f"counts off by {g.extra_tensor_count}/{g.extra_kv_count}"
    key = rng.choice(keys)                              # a duplicate key
    g.kvs.append(g.kv(key))
    return g.to_bytes(), f"duplicate key {key}"


def _strings(g: Gguf, key: str) -> list[str]:
    raw = g.kv(key).raw
    n = struct.unpack_from("<Q", raw, 4)[0]
    pos, out = 12, []
    for _ in range(n):
        m = struct.unpack_from("<Q", raw, pos)[0]
        out.append(raw[pos + 8:pos + 8 + m].decode("utf-8", "surrogatepass"))
        pos += 8 + m
    return out


def _value_of(vtype: int, rng: random.Random):
    if vtype == ARRAY:
        return None
    if vtype == STRING:
        return rng.choice(NASTY_TEXT)
    if vtype in (F32, F64):
        return rng.choice([0.0, 1.0, -1.0, float("nan"), float("inf"), 1e38])
    if vtype == BOOL:
        return rng.random() < 0.5
    lo, hi = {U8: (0, 255), I8: (-128, 127), U16: (0, 65535), I16: (-32768, 32767),
              U32: (0, (1 << 32) - 1), I32: (-(1 << 31), (1 << 31) - 1),
              U64: (0, (1 << 64) - 1), I64: (-(1 << 63), (1 << 63) - 1)}[vtype]
    return rng.choice([lo, hi, 0, 1, 2, 6, min(hi, 512)])


# -- what a mutant is put through ---------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": "<|channel>thought\nhm<channel|>Hello."},
            {"role": "user", "content": "Why is the sky blue?"}]


SMALL = dict(num_hidden_layers=2, num_experts=4, vocab_size=400)


def base_files(out_dir) -> dict[str, bytes]:
    """The well-formed tiny files the mutants start from: F32, Q8_0 and Q4_K_M (rows of 256, so
    Q4_K / Q6_K blocks are really used), random weights, the toy vocabulary and template."""
    from pathlib import Path

    from diffcli.testing import make_random_gguf
    out = {}
    for kind, variant in (("f32", "h64"), ("q8_0", "h64"), ("q4_k_m", "h256")):
        p = make_random_gguf(Path(out_dir) / f"base-{kind}.gguf", SMALL, outtype=kind, variant=variant)
        out[kind] = p.read_bytes()
    return out


class Inconsistent(Exception):
    """inspect and run disagree about a file (not a DiffcliError: the fuzzer reports it)."""


def exercise(path, load: bool = True) -> str:
    """Open, inspect, tokenize, render the chat template of and load `path`, as `diffcli inspect`
    and `diffcli run` would. Returns how far it got ("ok" at the end). A DiffcliError propagates
    (the expected way to fail); anything else is a foreign exception. Raises Inconsistent when
    inspect calls the file runnable and `run`'s steps (open_model_file, diffcli.load) refuse it,
    or the other way round."""
    from diffcli.cli.inspect import describe, render_text
    from diffcli.engine.loading import open_model_file
    from diffcli.errors import DiffcliError
    from diffcli.gguf.reader import open_gguf
    from diffcli.text.chat import encode_prompt

    f = open_gguf(path)
    d = describe(f)                  # config, tensors, sampler keys, tokenizer, template
    render_text(d, verbose=True)
    if d["architecture"] != "diffusion-gemma":
        return "other architecture"
    for name in f.tensor_names[:4]:
        f.tensor(name)
    if not load:
        return "inspected"
    try:
        mf = open_model_file(path)
        import diffcli
        diffcli.load(path, device="cpu", dtype="f32")
    except DiffcliError as exc:
        if d["runnable"]:
            raise Inconsistent(f"inspect: runnable; run: {exc.message}") from None
        raise
    if not d["runnable"]:
        raise Inconsistent("inspect: " + "; ".join(d["problems"]) + "; run: accepted")
    tok = mf.tokenizer
    ids = tok.encode("Hello world\n\n<|turn>user <bos> \u00e9\U0001f600")
    tok.decode(ids)
    tok.decode(list(range(len(tok))), special=True)
    encode_prompt(tok, mf.template.render(MESSAGES))
    return "ok"


def scratch_dir(fallback) -> str:
    """A directory in memory (/dev/shm) when there is one: writing mutants is most of the I/O."""
    import os
    import tempfile
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return tempfile.mkdtemp(prefix="diffcli-fuzz-", dir="/dev/shm")
    return str(fallback)
