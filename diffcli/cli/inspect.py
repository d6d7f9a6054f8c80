"""`diffcli inspect FILE.gguf`: what is in a GGUF file, and whether diffcli can run it.

Shows the architecture, the model config (diffusion-gemma files), the tensors (per-layer tensors
folded into one `blk.*.` row unless `--verbose`), the quantisation mix, the parameter count and
the memory a run needs. Rich tables on a terminal, plain text in a pipe, one JSON object with
`--json`. Any GGUF file gets the file-level view; a diffusion-gemma file that diffcli cannot run
(a bad config, a tensor type without a dequantiser) is shown, then reported as an error (exit 2).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import click

from ..errors import DiffcliError, InputError
from ..model.config import ARCH, ModelConfig


if TYPE_CHECKING:       # the reader and the block formats import torch: not for --help
    from ..gguf.reader import GGUFFile

RUNTIME_CONTEXT = 4096          # tokens of KV cache assumed by the memory estimate
_LONG_ARRAY = 8                 # arrays longer than this are summarised in the metadata view


# -- the facts (plain data, also the --json output) -----------------------------------------

def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _summarise_value(value: Any) -> Any:
    if isinstance(value, list) and len(value) > _LONG_ARRAY:
        return {"length": len(value), "head": value[:4]}
    return value


def runtime_estimate(cfg: ModelConfig, f: GGUFFile, act_bytes: int,
                     context: int = RUNTIME_CONTEXT) -> dict[str, int]:
    """Bytes a run needs on top of the memory-mapped weights (spec §B, §C).

    - embedding: the tied embedding dequantised to the activation dtype (the LM head and the
      self-conditioning soft embedding both multiply by all of it);
    - kv_cache: K and V of every layer for `context` tokens (sliding layers keep W-1);
    - logits: the canvas logits, probabilities and self-conditioning input in float32;
    - work: the largest other weight dequantised at once (one expert of an expert tensor)."""
    embed = cfg.vocab_size * cfg.n_embd * act_bytes
    kv = 0
    for i in range(cfg.n_layer):
        tokens = min(context, cfg.sliding_window - 1) if cfg.is_sliding(i) else context
        kv += 2 * cfg.n_head_kv[i] * cfg.layer_head_dim(i) * tokens * act_bytes
    logits = 3 * cfg.canvas_length * cfg.vocab_size * 4
    work = 0
    for name in f.tensor_names:
        if name == "token_embd.weight":
            continue
        shape = f.info(name).shape
        per = _numel(shape[1:]) if "_exps." in name and len(shape) == 3 else _numel(shape)
        work = max(work, per * act_bytes)
    return {"embedding": embed, "kv_cache": kv, "logits": logits, "work": work,
            "total": embed + kv + logits + work}


def _problem(exc: DiffcliError) -> str:
    """A refusal as `problems` lists it: what is wrong; what to do."""
    return exc.problem + (f"; {exc.fix}" if exc.fix else "")


def _check(problems: list[str], fn, *args):
    """fn(*args), or None with its InputError's message added to `problems`."""
    try:
        return fn(*args)
    except DiffcliError as exc:
        problems.append(_problem(exc))
        return None


def runtime_problems(f: GGUFFile, cfg: ModelConfig) -> list[str]:
    """What `diffcli run` would refuse besides the config and the tensors, checked the way it
    checks them: the sampler keys, the tokenizer and the chat template."""
    from ..generation.sampler import SamplerConfig
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer

    problems: list[str] = []
    _check(problems, SamplerConfig.resolve, cfg)
    tok = _check(problems, Tokenizer.from_gguf, f)
    if tok is not None and tok.chat_template:
        _check(problems, lambda: ChatTemplate(tok.chat_template, path=str(f.path)))
    return problems


def describe(f: GGUFFile) -> dict[str, Any]:
    """Everything `inspect` shows, as JSON-ready data."""
    from ..model.weights import RUNNABLE_TYPES, problems as tensor_problems
    tensors = []
    for name in f.tensor_names:
        info = f.info(name)
        tensors.append({"name": name, "type": info.qtype, "shape": list(info.shape),
                        "bytes": info.nbytes, "offset": info.offset})
    mix = Counter(t["type"] for t in tensors)
    unsupported = sorted(t for t in mix if t not in RUNNABLE_TYPES)
    problems: list[str] = []
    config = None
    memory: dict[str, Any] = {"file": f.file_size}
    if f.architecture == ARCH:
        cfg = _check(problems, ModelConfig.from_gguf, f)
        if cfg is not None:
            config = dataclasses.asdict(cfg)
            ctx = min(RUNTIME_CONTEXT, cfg.context_length)
            memory["runtime_cpu_f32"] = runtime_estimate(cfg, f, 4, ctx)
            memory["runtime_gpu_bf16"] = runtime_estimate(cfg, f, 2, ctx)
            memory["runtime_context_tokens"] = ctx
            # the tensors `load` reads, checked as `load` checks them (model/weights.py)
            problems += [_problem(e) for e in tensor_problems(f, cfg)]
        if unsupported and config is None:
            problems.append(f"tensor types without a dequantiser: {', '.join(unsupported)}; "
                            "re-quantize the model to Q4_K_M or Q8_0")
        if cfg is not None:
            problems += runtime_problems(f, cfg)
    return {
        "file": str(f.path),
        "file_size": f.file_size,
        "gguf_version": f.version,
        "architecture": f.architecture,
        "name": f.metadata.get("general.name"),
        "file_type": f.metadata.get("general.file_type"),
        "n_tensors": len(tensors),
        "n_params": sum(_numel(tuple(t["shape"])) for t in tensors),
        "type_mix": dict(mix.most_common()),
        "unsupported_types": unsupported,
        "runnable": f.architecture == ARCH and not problems,
        "problems": problems,
        "config": config,
        "memory": memory,
        "metadata": {k: _summarise_value(v) for k, v in f.metadata.items()},
        "tensors": tensors,
    }


def fold_layers(tensors: list[dict]) -> list[dict]:
    """One row per tensor name with `blk.N.` replaced by `blk.*.`: count, types, shapes, bytes."""
    rows: dict[str, dict] = {}
    for t in tensors:
        key = re.sub(r"^blk\.\d+\.", "blk.*.", t["name"])
        row = rows.setdefault(key, {"name": key, "count": 0, "types": Counter(),
                                    "shapes": Counter(), "bytes": 0})
        row["count"] += 1
        row["types"][t["type"]] += 1
        row["shapes"][tuple(t["shape"])] += 1
        row["bytes"] += t["bytes"]
    return list(rows.values())


# -- rendering ------------------------------------------------------------------------------

def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def _mix(counter: Counter | dict) -> str:
    items = counter.most_common() if isinstance(counter, Counter) else counter.items()
    return ", ".join(f"{k} {v}" for k, v in items)


def _join(values: list) -> str:
    return "/".join(map(str, values)) or "-"


def _types(counter: Counter) -> str:
    return next(iter(counter)) if len(counter) == 1 else _mix(counter)


def _shapes(counter: Counter) -> str:
    return " | ".join("x".join(map(str, s)) or "scalar" for s in counter)


def _config_lines(cfg: dict) -> list[tuple[str, str]]:
    full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full"]
    kv = {t: sorted({cfg["n_head_kv"][i] for i, x in enumerate(cfg["layer_types"]) if x == t})
          for t in ("sliding", "full")}
    return [
        ("layers", f"{cfg['n_layer']} (full attention at {', '.join(map(str, full)) or 'none'}; "
                   f"the rest sliding, window {cfg['sliding_window']})"),
        ("hidden / dense MLP", f"{cfg['n_embd']} / {cfg['n_ff']}"),
        ("heads", f"{cfg['n_head']} query; KV {_join(kv['sliding'])} sliding, "
                  f"{_join(kv['full'])} full"),
        ("head dim", f"{cfg['head_dim_swa']} sliding, {cfg['head_dim']} full "
                     f"({cfg['n_rot']} rotated pairs)"),
        ("rope theta", f"{cfg['rope_theta_swa']:g} sliding, {cfg['rope_theta']:g} full"),
        ("experts", f"{cfg['n_expert']}, top-{cfg['n_expert_used']}, width {cfg['n_ff_exp']}"),
        ("vocab / canvas", f"{cfg['vocab_size']} / {cfg['canvas_length']}"),
        ("context", str(cfg["context_length"])),
        ("softcap / rms eps", f"{cfg['final_logit_softcap']:g} / {cfg['rms_eps']:g}"),
        ("sampler defaults", ", ".join(f"{k}={v:g}" for k, v in cfg["sampler_defaults"].items())),
    ]


def _summary_lines(d: dict) -> list[tuple[str, str]]:
    lines = [
        ("file", f"{d['file']} ({_size(d['file_size'])}, GGUF v{d['gguf_version']})"),
        ("architecture", d["architecture"] or "(none)"),
    ]
    if d["name"]:
        lines.append(("name", str(d["name"])))
    lines += [
        ("tensors", f"{d['n_tensors']} ({d['n_params']:,} parameters)"),
        ("types", _mix(d["type_mix"])),
    ]
    mem = d["memory"]
    if "runtime_cpu_f32" in mem:
        cpu, gpu = mem["runtime_cpu_f32"]["total"], mem["runtime_gpu_bf16"]["total"]
        lines.append(("memory", f"{_size(mem['file'])} weights (memory-mapped) + about "
                                f"{_size(cpu)} on CPU (float32) / {_size(gpu)} on GPU (bf16) "
                                f"for a {mem['runtime_context_tokens']}-token context"))
    else:
        lines.append(("memory", f"{_size(mem['file'])} weights (memory-mapped)"))
    if d["architecture"] != ARCH:
        lines.append(("note", f"not a {ARCH} file: diffcli can inspect it but not run it"))
    for p in d["problems"]:
        lines.append(("problem", p))
    return lines


def _tensor_rows(d: dict, verbose: bool) -> tuple[list[str], list[list[str]]]:
    if verbose:
        return (["tensor", "type", "shape", "bytes"],
                [[t["name"], t["type"], "x".join(map(str, t["shape"])) or "scalar",
                  f"{t['bytes']:,}"] for t in d["tensors"]])
    return (["tensor", "count", "types", "shape", "bytes"],
            [[r["name"], str(r["count"]), _types(r["types"]), _shapes(r["shapes"]),
              _size(r["bytes"])] for r in fold_layers(d["tensors"])])


def _aligned(pairs: list[tuple[str, str]], indent: str) -> list[str]:
    width = max(len(k) for k, _ in pairs) + 2
    return [f"{indent}{k:<{width}}{v}" for k, v in pairs]


def render_text(d: dict, verbose: bool = False) -> str:
    out = _aligned(_summary_lines(d), "")
    if d["config"]:
        out += ["", "model config"] + _aligned(_config_lines(d["config"]), "  ")
    head, rows = _tensor_rows(d, verbose)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    out += ["", "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if verbose:
        out += ["", "metadata"] + [f"  {k} = {v!r}" for k, v in d["metadata"].items()]
    return "\n".join(out)


def render_rich(d: dict, console, verbose: bool = False) -> None:
    from rich.table import Table

    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    for k, v in _summary_lines(d):
        summary.add_row(k, f"[red]{v}[/]" if k == "problem" else v)
    console.print(summary)
    if d["config"]:
        cfg = Table(title="model config", show_header=False, title_justify="left")
        cfg.add_column(style="bold")
        cfg.add_column()
        for k, v in _config_lines(d["config"]):
            cfg.add_row(k, v)
        console.print(cfg)
    head, rows = _tensor_rows(d, verbose)
    table = Table(title="tensors", title_justify="left")
    for h in head:
        table.add_column(h, justify="right" if h in ("count", "bytes") else "left")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if verbose:
        meta = Table(title="metadata", show_header=False, title_justify="left")
        meta.add_column(style="bold")
        meta.add_column(overflow="fold")
        for k, v in d["metadata"].items():
            meta.add_row(k, repr(v))
        console.print(meta)


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--verbose", "-v", is_flag=True,
              help="Every tensor and all metadata (and a traceback on errors).")
def inspect_cmd(file: str, as_json: bool, verbose: bool) -> None:
    """Show what is in a GGUF file: architecture, config, tensors, types, memory."""
    from ..gguf.reader import open_gguf
    d = describe(open_gguf(file))
    if as_json:
        click.echo(json.dumps(d, default=str))
    elif sys.stdout.isatty():
        from rich.console import Console
        render_rich(d, Console(), verbose)
    else:
        click.echo(render_text(d, verbose))
    if d["problems"]:
        raise InputError("; ".join(d["problems"]), path=file)
