"""Untrusted files (issue 13, items 5-11): a GGUF header, its tensor table, its config, its
tokenizer and its chat template are input, and every way they can be wrong is one InputError
line naming the file, the field and what it must be; nothing runs on shifted weights, no count
in a header is allocated before it is checked against the bytes that could hold it."""
from __future__ import annotations

import json
import re
import struct
import warnings

import pytest
from click.testing import CliRunner

import _gguffuzz as gz
from _gguffuzz import ARRAY, F32, I32, STRING, U32, U64, Gguf
from diffcli.cli import cli
from diffcli.errors import InputError
from diffcli.gguf.reader import open_gguf
from diffcli.model.config import ModelConfig
from diffcli.text.chat import ChatTemplate
from diffcli.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return gz.base_files(tmp_path_factory.mktemp("bases"))


@pytest.fixture
def f32(bases):
    return Gguf.parse(bases["f32"])


def write(tmp_path, data: bytes | Gguf, name: str = "bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data.to_bytes() if isinstance(data, Gguf) else data)
    return p


def refused(path, *words, call=open_gguf) -> str:
    with pytest.raises(InputError) as err:
        call(path)
    msg = err.value.message
    assert err.value.exit_code == 2
    assert msg.startswith(str(path)) and "\n" not in msg and "\x00" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def inspect(path, *args):
    return CliRunner().invoke(cli, ["inspect", str(path), *args])


def assert_inspect_refuses(path, *words):
    res = inspect(path, "--json")
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith(f"diffcli: error: {path}") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return res


def test_the_base_files_are_runnable(tmp_path, bases):
    """The control: every unmodified base file opens, inspects as runnable and loads."""
    for kind, data in bases.items():
        p = write(tmp_path, data, f"{kind}.gguf")
        assert Gguf.parse(data).to_bytes() == data
        res = inspect(p, "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["runnable"] and json.loads(res.stdout)["problems"] == []
        assert gz.exercise(p) == "ok"


# -- item 5: tensor data offsets --------------------------------------------------------------

def test_a_shifted_offset_is_refused_like_llama_cpp(tmp_path, f32):
    t = f32.tensor("blk.1.ffn_down.weight")
    want = t.offset
    t.offset += 32                                # still aligned, inside the file: shifted weights
    p = write(tmp_path, f32)
    refused(p, "'blk.1.ffn_down.weight'", f"offset {want + 32:,}", f"expected {want:,}")
    assert_inspect_refuses(p, "blk.1.ffn_down.weight", f"expected {want:,}")


def test_misaligned_overlapping_and_last_offsets(tmp_path, bases):
    g = Gguf.parse(bases["q8_0"])
    g.tensors[3].offset += 1
    refused(write(tmp_path, g), "not a multiple of the alignment 32")
    g = Gguf.parse(bases["q8_0"])
    g.tensors[5].offset = g.tensors[4].offset    # overlaps the one before
    refused(write(tmp_path, g), g.tensors[5].name.decode(), "expected")
    g = Gguf.parse(bases["q8_0"])
    last = g.tensors[-1]
    last.offset += 32                            # the last one: nothing after it to collide with
    g.data += b"\x00" * 64                       # and the file is long enough for it
    refused(write(tmp_path, g), last.name.decode(), f"expected {last.offset - 32:,}")


# -- item 6: exact element counts -------------------------------------------------------------

def test_dims_whose_int64_product_wraps_are_refused(tmp_path, f32):
    t = f32.tensor("blk.0.attn_norm.weight")
    t.dims = [1 << 32, 1 << 32, 4]               # 2^66 elements: an int64 product wraps to 0
    refused(write(tmp_path, f32), "'blk.0.attn_norm.weight'", "do not fit in 64 bits")


def test_a_dim_of_2_to_the_63_gives_no_numpy_warning(tmp_path, f32):
    f32.tensor("blk.0.attn_norm.weight").dims = [1 << 63]
    p = write(tmp_path, f32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused(p, "'blk.0.attn_norm.weight'", "64 bits")


def test_exact_byte_counts_for_every_tensor(bases, tmp_path):
    """nbytes = elements / block size * block bytes, with Python integers (Q4_K, Q6_K, Q8_0, F32)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    f = open_gguf(write(tmp_path, bases["q4_k_m"]))
    types = set()
    for name in f.tensor_names:
        info = f.info(name)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[info.qtype]]
        n = 1
        for d in info.ggml_dims:
            n *= d
        assert info.nbytes == n // block * size
        types.add(info.qtype)
    assert {"Q4_K", "Q6_K", "F32"} <= types


# -- item 7: config problems are InputErrors, and inspect lists them ----------------------------

A = "diffusion-gemma."
CONFIG_CASES = [   # (key, GGUF type, value, item type, words the message must hold)
    (A + "block_count", U32, 3, None, ["head_count_kv", "3"]),
    (A + "attention.head_count", U32, 3, None, ["head_count_kv", "divisor"]),
    (A + "attention.head_count_kv", ARRAY, [0, 0], I32, ["head_count_kv", "0"]),
    (A + "attention.head_count_kv", U32, 0, None, ["head_count_kv", "from 1"]),
    ("diffusion.canvas_length", U32, 0, None, ["canvas_length", "0"]),
    (A + "attention.sliding_window", U32, 0, None, ["sliding_window", "0"]),
    (A + "expert_used_count", U32, 9, None, ["expert_used_count", "9", "expert_count"]),
    (A + "rope.freq_base", F32, float("nan"), None, ["rope.freq_base", "nan", "finite"]),
    (A + "embedding_length", F32, float("nan"), None, ["embedding_length", "nan", "integer"]),
    (A + "block_count", STRING, "six", None, ["block_count", "'six'", "integer"]),
    (A + "attention.sliding_window_pattern", ARRAY, ["a", "b"], STRING,
     ["sliding_window_pattern", "bool"]),
    (A + "attention.key_length", U32, 31, None, ["key_length", "31", "even"]),
    (A + "final_logit_softcapping", F32, 0.0, None, ["final_logit_softcapping", "above 0"]),
    ("tokenizer.ggml.bos_token_id", U32, 9999, None, ["bos_token_id", "9999", "token id"]),
    ("tokenizer.ggml.eos_token_id", STRING, "x", None, ["eos_token_id", "'x'"]),
    (A + "context_length", U32, 8, None, ["canvas_length", "context_length"]),
]


@pytest.mark.parametrize("key,vtype,value,item,words", CONFIG_CASES,
                         ids=[f"{c[0].rsplit('.', 1)[-1]}={c[2]!r}" for c in CONFIG_CASES])
def test_config_problems_are_input_errors_and_inspect_lists_them(tmp_path, f32, key, vtype,
                                                                 value, item, words):
    from diffcli.engine.loading import open_model_file
    p = write(tmp_path, f32.set(key, vtype, value, item))
    refused(p, *words, call=open_model_file)             # what `run` does first
    res = assert_inspect_refuses(p, *words)
    d = json.loads(res.stdout)
    assert not d["runnable"] and d["problems"]


def test_inspect_and_run_agree_on_missing_tensors(tmp_path):
    """The partial tiny file (no tokenizer, a few tensors): run refuses it, so inspect does."""
    import _tinygguf
    p = _tinygguf.write(tmp_path / "partial.gguf")
    res = assert_inspect_refuses(p, "is missing")
    assert json.loads(res.stdout)["runnable"] is False


# -- item 8: tokenizer data -------------------------------------------------------------------

def _strings(g, key):
    return gz._strings(g, key)


def test_merges_naming_unknown_tokens(tmp_path, f32):
    merges = _strings(f32, "tokenizer.ggml.merges")
    merges[5] = "zq\n qz\x00"
    p = write(tmp_path, f32.set("tokenizer.ggml.merges", ARRAY, merges, STRING))
    msg = refused(p, "tokenizer.ggml.merges entry 5", r"'zq\n qz\x00'", "not in the vocabulary",
                  call=Tokenizer.from_gguf)
    assert "\x00" not in msg


def test_tokens_of_the_wrong_type(tmp_path, f32):
    n = len(_strings(f32, "tokenizer.ggml.tokens"))
    p = write(tmp_path, f32.set("tokenizer.ggml.tokens", ARRAY, list(range(n)), I32))
    refused(p, "tokenizer.ggml.tokens", "array of strings", call=Tokenizer.from_gguf)


def test_a_vocabulary_of_duplicates(tmp_path, f32):
    n = len(_strings(f32, "tokenizer.ggml.tokens"))
    p = write(tmp_path, f32.set("tokenizer.ggml.tokens", ARRAY, ["a"] * n, STRING))
    refused(p, "tokenizer.ggml.merges", "not in the vocabulary", call=Tokenizer.from_gguf)
    assert_inspect_refuses(p, "tokenizer.ggml.merges")


def test_token_types_of_the_wrong_length(tmp_path, f32):
    p = write(tmp_path, f32.set("tokenizer.ggml.token_type", ARRAY, [1, 1, 1], I32))
    refused(p, "token_type", "3 entries", call=Tokenizer.from_gguf)


# -- item 9: hostile sizes --------------------------------------------------------------------

def _sparse_header(tmp_path, item_type: int, count: int, size: int):
    """A file whose only key claims `count` array elements, made sparse to `size` bytes."""
    head = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gz.enc_str("x.big")
            + struct.pack("<IIQ", ARRAY, item_type, count))
    p = tmp_path / "sparse.gguf"
    with open(p, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return p


@pytest.mark.parametrize("item_type", [U32, STRING])
def test_a_sparse_file_claiming_2_to_the_30_elements(tmp_path, item_type):
    """4 KiB of real data, 2^32 bytes of apparent size: enough for 2^30 u32 elements by size
    alone, so only the limit on the element count stops the allocation."""
    p = _sparse_header(tmp_path, item_type, 1 << 30, (1 << 32) + 4096)
    refused(p, "'x.big'", "1,073,741,824 elements", "corrupt GGUF header")
    assert_inspect_refuses(p, "1,073,741,824")


def test_numeric_arrays_are_bounded_by_the_bytes_left(tmp_path):
    p = _sparse_header(tmp_path, U64, 1 << 20, 4096)        # 8 MiB claimed, 4 KiB there
    refused(p, "'x.big'", "1,048,576 UINT64 elements", "bytes are left")


def test_counts_beyond_any_file(tmp_path, f32):
    data = f32.to_bytes()
    for label, what in (("key count", "the key count"), ("tensor count", "the tensor count")):
        p = write(tmp_path, gz.patch(data, gz.field(data, "count", label), 1 << 62))
        refused(p, what, "corrupt GGUF header")


# -- item 10: corrupt header vs truncated file -------------------------------------------------

def test_corrupt_lengths_in_a_full_size_file_are_not_called_truncated(tmp_path, bases):
    data = bases["f32"]
    cases = [("strlen", "key general.name", 1 << 40), ("strlen", "general.name", 5_000_000),
             ("count", "tokenizer.ggml.tokens (count)", 2_000_000),
             ("strlen", "tokenizer.ggml.merges[7]", 1 << 20),
             ("strlen", "tensor token_embd.weight", 1 << 33)]
    for kind, label, value in cases:
        f = gz.field(data, kind, label)
        msg = refused(write(tmp_path, gz.patch(data, f, value)), "corrupt GGUF header")
        assert "truncated" not in msg and "incomplete" not in msg, msg
        assert f"at byte {f.offset:,}" in msg or "at byte" in msg, msg


def test_a_file_that_really_ends_early_is_called_truncated(tmp_path, bases):
    data = bases["f32"]
    flds = gz.fields(data)
    inside_tokens = next(f for f in flds if f.kind == "str" and f.label.startswith("tokenizer.ggml.tokens[")
                         and f.size > 2)
    inside_template = next(f for f in flds if f.kind == "str" and f.label == "tokenizer.chat_template")
    for cut in (30, 301, inside_tokens.offset + 1, inside_template.offset + 100,
                inside_template.offset - 3):
        msg = refused(write(tmp_path, data[:cut]), "truncated", f"ends at byte {cut:,}")
        assert "download" in msg
        # the field's offset plus the bytes said to be left is where the file ends
        got = re.search(r"\(at byte ([\d,]+)\), which needs ([\d,]+) bytes?, but "
                        r"(?:only ([\d,]+) bytes? (?:is|are)|no bytes are) left", msg)
        assert got, msg
        at, need, left = (int((g or "0").replace(",", "")) for g in got.groups())
        assert at + left == cut and need > left, msg
    refused(write(tmp_path, data[:-100]), "past the end of the file", "download")


def test_unknown_value_types_use_no_internal_names(tmp_path, bases):
    data = bases["f32"]
    f = gz.field(data, "vtype", "general.architecture (type)")
    msg = refused(write(tmp_path, gz.patch(data, f, 77)), "'general.architecture'",
                  "value type 77", "not a GGUF type", f"at byte {f.offset:,}")
    assert "GGUFValueType" not in msg


def test_key_and_tensor_names_are_escaped_in_messages(tmp_path, f32):
    f32.tensors[2].name = f32.tensors[1].name
    refused(write(tmp_path, f32), "repeats the tensor name")
    g = Gguf.parse(f32.to_bytes())
    g.kvs.append(gz.KV(b"bad\nkey\x00", U32, struct.pack("<I", 1)))
    g.kvs.append(gz.KV(b"bad\nkey\x00", U32, struct.pack("<I", 1)))
    msg = refused(write(tmp_path, g), r"'bad\nkey\x00'", "repeats the key")
    assert "\x00" not in msg


# -- item 11: the chat template is untrusted ---------------------------------------------------

HOSTILE = {
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                     "{% endfor %}", "loop iterations"),
    "nested loops over lists": ("{% set a = range(100000)|list %}{% for i in a %}{% for j in a %}"
                                "{% endfor %}{% endfor %}", "loop iterations"),
    # 1,000 characters an iteration: the output bound (4 Mi characters) is reached after ~4,200
    # iterations, long before the step bound (250,000) would stop it
    "output": ("{% for i in range(100000) %}{% for j in range(100000) %}" + "0123456789" * 100
               + "{% endfor %}{% endfor %}", "output is longer"),
    "include": ("{% include 'other.jinja' %}", "include"),
    "import": ("{% import 'macros.jinja' as m %}", "import"),
    "extends": ("{% extends 'base.jinja' %}", "extends"),
    "huge range": ("{{ range(10**9)|list|length }}", "range()"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    "string times 10**10": ("{{ 'x' * 10**10 }}", "10,000,000,000"),
    "center": ("{{ 'x'|center(10**10) }}", "center"),
    "ljust": ("{{ 'x'.ljust(10**10) }}", "ljust"),
    "format width": ("{{ '{:>10000000000}'.format('x') }}", "format width"),
    "printf width": ("{{ '%*s' % (10**10, 'x') }}", "too large"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", "string or list"),
    "replace": ("{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}", "string or list"),
    "join": ("{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|join }}", "string or list"),
    "big integers": ("{% set ns = namespace(n=3) %}{% for i in range(64) %}"
                     "{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}", "bits"),
    "power": ("{{ 10 ** (10 ** 7) }}", "bits"),
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "deep nesting": ("{{" + "(" * 3000 + "1" + ")" * 3000 + "}}", "nests too deeply"),
    "syntax": ("{% for %}", "does not parse"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_end_in_one_input_error_line(name):
    source, word = HOSTILE[name]
    with pytest.raises(InputError) as err:
        ChatTemplate(source, path="model.gguf").render([{"role": "user", "content": "hi"}])
    msg = err.value.message
    assert msg.startswith("model.gguf: ") and "\n" not in msg and word in msg, msg


def test_render_time_is_bounded(monkeypatch):
    """An exponential macro makes few steps per second; the wall-clock bound stops it."""
    from diffcli.text.chat import TemplateLimits

    class Quick(TemplateLimits):
        seconds = 0.2
    src = ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
           "{{ f(60) }}")
    with pytest.raises(InputError, match="longer than 0.2 s"):
        ChatTemplate(src, limits=Quick).render([])


def test_limits_grow_with_the_messages():
    """A long prompt is not refused for being long: the size bounds scale with the input."""
    text = "word " * 2_000_000                                        # 10 M characters
    out = ChatTemplate(None).render([{"role": "user", "content": text}])
    assert text.strip() in out


def test_the_sandbox_still_holds_and_real_templates_render_as_before():
    from diffcli.testing import toy_chat_template
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<|channel>thought\nx<channel|>Hello."},
            {"role": "user", "content": "Why?"}]
    from test_chat import _oracle
    for src in (toy_chat_template(), None):
        tmpl = ChatTemplate(src)
        assert tmpl.render(msgs) == _oracle(tmpl.source, msgs)
    with pytest.raises(InputError, match="unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render(msgs)
