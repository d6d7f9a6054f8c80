"""One run of the model from the command line: open the model, tokenizer, sampler and chat
template once (`open_session`), then generate a turn (`run_turn`) streaming the answer to stdout
or the live view, and report it (`report`: --json, the end-of-turn statistics). Used by `run`
(one prompt) and by the chat loop (`-cnv`).

Shell contract: the answer alone on stdout; logs, progress and statistics on stderr. No tensor
code lives here.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import InputError, RuntimeFailure
from .options import RunOptions
from .text_input import not_utf8, utf8_text


def log(msg: str) -> None:
    """A line on stderr. Diagnostics are best-effort: a stderr that cannot be written (`2>/dev/full`)
    must not cost the user the answer on stdout."""
    try:
        click.echo(msg, err=True)
    except OSError:
        pass


@dataclass
class Session:
    """Everything a turn needs, opened once."""
    opts: RunOptions
    model: Any
    tokenizer: Any
    sampler: Any
    conversation: Any
    n_canvases: int
    canvas_length: int
    context: int
    kv_cache: bool
    trace: Any = None
    stdout: Any = field(default_factory=lambda: GuardedOutput(sys.stdout, "stdout"))
    vision: Any = None                                        # the mmproj's tower (--mmproj)
    image_embeds: dict = field(default_factory=dict)          # digest -> soft tokens
    turns: int = 0                                            # replies generated so far


# ---- opening ---------------------------------------------------------------------------------

def read_prompt(opts: RunOptions) -> str | None:
    stdin = sys.stdin
    if opts.prompt == "-":
        return read_stdin(stdin)
    if opts.file is not None:
        try:
            return Path(opts.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read the prompt file: {exc.strerror}", path=opts.file,
                             fix="check the -f path") from None
        except UnicodeDecodeError:
            raise InputError("the prompt file is not UTF-8 text", path=opts.file,
                             fix="convert it to UTF-8") from None
    if opts.prompt is not None:
        return utf8_text(opts.prompt, "-p")
    if not opts.conversation and not _isatty(stdin):
        return read_stdin(stdin)
    return None


def read_stdin(stdin) -> str:
    """All of stdin as text, decoded as UTF-8 here (not by the locale's codec, which may raise a
    bare UnicodeDecodeError or hand back lone surrogates)."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:
        return utf8_text(stdin.read(), "stdin")
    return decode_utf8(buffer.read(), "stdin")


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(what, exc, fix="convert it to UTF-8 (e.g. with iconv)") from None


def read_template_file(opts: RunOptions) -> str | None:
    """--chat-template-file's text (None without it), as one-line errors."""
    path = opts.chat_template_file
    try:
        return opts.chat_template_source(None)
    except UnicodeDecodeError as exc:
        raise not_utf8("the chat template", exc, path=path, fix="convert it to UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read the chat template: {exc.strerror}", path=path,
                         fix="check the --chat-template-file path") from None


def check_trace_path(opts: RunOptions) -> None:
    """--trace never destroys a file: not an input of this run (even with --force), and not an
    existing file unless --force is given. Checked before anything is loaded."""
    if opts.trace is None:
        return
    inputs = [("-m", opts.model), ("-f", opts.file), ("-sysf", opts.system_file),
              ("--chat-template-file", opts.chat_template_file),
              ("--mmproj", opts.mmproj), *(("--image", i) for i in opts.image)]
    for flag, path in inputs:
        if path is not None and _same_file(opts.trace, path):
            raise InputError(f"--trace would overwrite the {flag} file", path=opts.trace,
                             fix="give --trace another file name")
    if os.path.isfile(opts.trace) and not opts.force:
        raise InputError("already exists and --trace does not overwrite files", path=opts.trace,
                         fix="give --trace a new file name, or add --force to overwrite it")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def open_session(opts: RunOptions) -> Session:
    from ..engine.loading import load_model, open_model_file, resolve_device
    from ..generation.prefix import PrefixCachedModel
    from ..text.chat import Conversation

    opts.validate()
    check_trace_path(opts)
    if opts.system is not None:
        utf8_text(opts.system, "-sys")
    if opts.chat_template_kwargs is not None:
        utf8_text(opts.chat_template_kwargs, "--chat-template-kwargs")
    prompt = read_prompt(opts)
    if prompt is None and not opts.conversation:
        raise InputError("no prompt given", fix="pass -p TEXT, -f FILE, pipe text on stdin, or use -cnv")
    if prompt is not None and not prompt.strip() and not opts.conversation:
        raise InputError("the prompt is empty", fix="pass some text with -p, -f or stdin")
    opts.prompt_text = prompt

    t0 = time.perf_counter()
    mf = open_model_file(opts.model, sampler_overrides=opts.sampler_overrides(),
                         template_source=read_template_file(opts),
                         template_path=opts.chat_template_file)
    cfg, sampler, tokenizer = mf.config, mf.sampler, mf.tokenizer
    C = mf.canvas_length
    n_canvases, context = size_run(opts, C, cfg.context_length)
    conversation = Conversation(mf.template, tokenizer, system=opts.system,
                                enable_thinking=opts.thinking_enabled(),
                                template_kwargs=opts.template_kwargs(),
                                use_template=not opts.no_chat_template)
    # llama.cpp's -ngl 0 keeps everything on the CPU
    device = resolve_device("cpu" if opts.n_gpu_layers == 0 and opts.device == "auto" else opts.device)
    for note in opts.ignored_notes():
        log(note)
    model = load_model(opts.model, device, dtype=opts.dtype, n_gpu_layers=opts.n_gpu_layers,
                       n_cpu_moe=opts.n_cpu_moe, override_tensor=tuple(opts.override_tensor),
                       mmap=not opts.no_mmap, threads=opts.threads,
                       cuda_graphs=not opts.no_cuda_graphs, log=log)
    dtype = str(model.dtype).removeprefix("torch.")
    if device == "cpu":
        dtype += f", {model.cpu_kernels} kernels"
    if model.step_graph is not None:
        dtype += ", CUDA graphs"
    log(f"diffcli: loaded {opts.model} ({cfg.n_layer} layers, vocab {len(tokenizer)}) on {device} "
        f"({dtype}) in {time.perf_counter() - t0:.2f}s")
    vision = None
    if opts.mmproj is not None:
        from .images import open_vision
        vision = open_vision(opts.mmproj, model, tokenizer)
        n = vision.config.n_layer
        log(f"diffcli: vision tower {opts.mmproj} ({n} layer{'s' * (n != 1)}, "
            f"{opts.image_max_tokens} soft tokens per image)")
    kv_cache = opts.diffusion_kv_cache != "off"
    if kv_cache and opts.conversation:
        model = PrefixCachedModel(model, checkpoint_id=tokenizer.token_to_id("<|turn>"))
    on_gpu = device not in ("cpu",)
    log(f"diffusion: -n {opts.n_predict} -> {n_canvases} blocks, n_ubatch={opts.ubatch_size} "
        f"n_batch={opts.batch_size} n_ctx={context} (canvas_length={C})")
    log(f"diffusion_eb: max_steps={sampler.max_steps} t=[{sampler.t_min:.2f},{sampler.t_max:.2f}] "
        f"entropy_bound={sampler.entropy_bound:g} stability={sampler.stability} "
        f"confidence={sampler.confidence:g} kv_cache={'on' if kv_cache else 'off'} "
        f"gpu_sampling={'on' if on_gpu else 'off'} sample_reduce={'on' if on_gpu else 'off'}")
    log(f"diffcli: seed {opts.seed}; thinking {'on' if conversation_thinking(conversation) else 'off'}")
    trace = open_trace(opts.trace, opts.force) if opts.trace else None
    return Session(opts, model, tokenizer, sampler, conversation, n_canvases, C, context,
                   kv_cache, trace, vision=vision)


def conversation_thinking(conv) -> bool:
    return bool(conv.template_kwargs.get("enable_thinking", conv.enable_thinking))


def size_run(opts: RunOptions, C: int, model_ctx: int) -> tuple[int, int]:
    """llama-diffusion-cli's sizing (§C.8): -n > 0 -> ceil(n/C) canvases and the batch/context
    sizes grown to fit them (a -c raised that way is logged); otherwise --diffusion-blocks
    canvases. -c 0 = the model's context; a -c beyond it is used, with llama.cpp's warning."""
    if opts.n_predict > 0:
        n = math.ceil(opts.n_predict / C)
        needed = n * C + 2048
        opts.ubatch_size = max(opts.ubatch_size, needed)
        opts.batch_size = max(opts.batch_size, opts.ubatch_size)
        if 0 < opts.ctx_size < needed:
            log(f"diffcli: -c {opts.ctx_size} raised to {needed} to fit -n {opts.n_predict} "
                f"({n} canvas{'es' * (n != 1)} of {C} + 2048, as llama-diffusion-cli does)")
            opts.ctx_size = needed
    else:
        n = opts.diffusion_blocks
    context = opts.ctx_size if opts.ctx_size > 0 else int(model_ctx)
    if context > int(model_ctx) > 0:
        log(f"diffcli: warning: -c {context} is more than the {int(model_ctx)} tokens the model "
            "was trained on; output past that may degrade")
    return n, context


def open_trace(path: str, force: bool = False):
    # "x": created here, so a file that appeared since check_trace_path is not truncated either;
    # a device or a pipe (/dev/null, >(jq ...)) is written to as it is
    mode = "w" if force or (os.path.exists(path) and not os.path.isfile(path)) else "x"
    try:
        return GuardedOutput(open(path, mode, encoding="utf-8"), f"the --trace file {path}")
    except FileExistsError:
        raise InputError("already exists and --trace does not overwrite files", path=path,
                         fix="give --trace a new file name, or add --force to overwrite it") from None
    except OSError as exc:
        raise InputError(f"cannot write the trace file: {exc.strerror}", path=path,
                         fix="check the --trace path") from None


class OutputError(RuntimeFailure):
    """Writing the answer, the JSON or the trace failed (a full disk, a closed device)."""
    stdout = False          # the failed stream was stdout


class GuardedOutput:
    """A text stream whose write errors become one-line OutputErrors naming the stream
    (`> /dev/full`: "cannot write to stdout: No space left on device"). A reader that left
    (BrokenPipeError) is passed on as it is: `diffcli ... | head -1` is not an error."""

    def __init__(self, stream, name: str):
        self.stream = stream
        self.name = name

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            err = OutputError(f"cannot write to {self.name}: {why}",
                              fix="free some disk space, or send the output elsewhere")
            err.stdout = self.name == "stdout"
            raise err from None

    def write(self, text: str) -> int:
        return self._guard(self.stream.write, text)

    def flush(self) -> None:
        self._guard(self.stream.flush)

    def close(self) -> None:
        self._guard(self.stream.close)

    def __getattr__(self, name):            # isatty, fileno, encoding ... for Rich and friends
        return getattr(self.stream, name)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---- one turn ------------------------------------------------------------------------------

@dataclass
class TurnResult:
    text: str            # the raw reply (user-defined tokens shown, control hidden)
    answer: str          # the reply without its thought channel
    thinking: str
    tokens: list[int]
    stats: Any           # GenerationStats; its total_ms is the whole turn (the one source of the
                         # figures on stderr, in --json and in the trace's "done" record)
    prompt_tokens: int


def run_turn(session: Session, prompt_ids: list[int], *, visual: bool,
             t_start: float | None = None, images=()) -> TurnResult:
    """Generate one reply, streaming the answer to stdout (or the live view) as canvases commit.
    `t_start`: when the turn began (before the template was rendered), for the total time.
    `images`: the prompt's (first soft token index, prepared image) slots."""
    from .. import stream
    from ..text.chat import split_thinking
    from .live import LiveView, ProgressLine, safe_piece, same_terminal

    opts, tok = session.opts, session.tokenizer
    t0 = time.perf_counter() if t_start is None else t_start
    n = session.n_canvases
    room = (session.context - len(prompt_ids)) // session.canvas_length
    if room < 1:
        raise InputError(f"the prompt ({len(prompt_ids)} tokens) plus one {session.canvas_length}-token "
                         f"canvas does not fit the context of {session.context} tokens",
                         fix="raise -c, or shorten the prompt (or /clear the chat)")
    if room < n:
        log(f"diffcli: context {session.context} fits only {room} of {n} canvases after the prompt")
        n = room
    decoder, raw, printed = tok.stream_decoder(), "", 0
    out = session.stdout
    show_thinking = opts.show_thinking
    live = None
    if visual:
        from rich.console import Console
        console = Console(file=out, highlight=False)
        # a real terminal, or one Rich is told is compatible (TTY_COMPATIBLE=1); FORCE_COLOR alone
        # (often set in CI) must not draw a live region into a file
        terminal = _isatty(out) or os.environ.get("TTY_COMPATIBLE") == "1"
        live = LiveView(console, tok.piece, n_canvases=n, interval=opts.diffusion_visual_interval,
                        progress=opts.diffusion_visual_progress, show_thinking=show_thinking,
                        enabled=terminal)
        if not live.enabled:
            log("diffcli: --diffusion-visual: stdout is not a terminal; live view off")
            live = None
    # control bytes (byte-fallback tokens can be ESC, CR, NUL) are shown as U+FFFD on a terminal,
    # where they would move the cursor, eat text or change the terminal's state; a file or a
    # pipe gets the text as it is
    to_terminal = not opts.json and (live is not None or _isatty(out))
    if live is None and not opts.json:
        # on the terminal the answer streams into, the bar goes on the line below the answer's
        progress = ProgressLine(below=same_terminal(out, sys.stderr))
    else:
        progress = ProgressLine(enabled=False)
    done = None
    if session.trace is not None:
        session.trace.write(json.dumps({"event": "prompt", "ids": list(prompt_ids)}) + "\n")
    spans = {}
    if images:
        from .images import image_spans
        spans = {"images": image_spans(session, images)}
    t_loop = time.perf_counter()
    events = stream(session.model, prompt_ids, max_new_tokens=n * session.canvas_length,
                    sampler=session.sampler, seed=opts.seed, mode="cli",
                    kv_cache=session.kv_cache, eog_ids=opts.eog_ids(tok), pad_id=tok.pad_id or 0,
                    **spans)
    if live is not None:
        live.start()
    try:
        for event in events:
            kind = type(event).__name__
            if session.trace is not None and kind != "Done":
                write_trace(session.trace, event)
            if kind == "StepEvent":
                progress.step(event)
                if live is not None:
                    live.on_step(event)
            elif kind == "CanvasEvent":
                raw += decoder.feed(event.tokens)
                if event.ended:
                    raw += decoder.flush()
                shown = raw if show_thinking else split_thinking(raw)[1]
                delta, printed = shown[printed:], len(shown)
                if to_terminal:
                    delta = safe_piece(delta)
                if live is not None:
                    live.on_canvas(event, delta, in_thought=_ends_in_thought(raw))
                elif not opts.json:
                    progress.close()
                    out.write(delta)
                    out.flush()
                    progress.answer(delta)
            else:
                done = event
    finally:
        progress.close()
        if live is not None:
            live.stop()
            out.write(live.pending_text())
    thinking, answer = split_thinking(raw)
    if not opts.json:
        shown = raw if show_thinking else answer
        if not shown.endswith("\n"):
            out.write("\n")
        out.flush()
    # every time of the turn from one origin, its start (before the template was rendered)
    stats = done.stats
    stats.prepare_ms = 1000.0 * (t_loop - t0)
    if stats.first_canvas_ms is not None:
        stats.first_canvas_ms += stats.prepare_ms
    stats.total_ms = 1000.0 * (time.perf_counter() - t0)
    session.turns += 1
    if session.trace is not None:
        write_trace(session.trace, done)
    return TurnResult(raw, answer, thinking, done.tokens, stats, len(prompt_ids))


def _ends_in_thought(text: str) -> bool:
    from ..text.chat import CHANNEL_CLOSE, CHANNEL_OPEN
    return text.rfind(CHANNEL_OPEN) > text.rfind(CHANNEL_CLOSE)


def write_trace(fh, event) -> None:
    kind = type(event).__name__
    if kind == "StepEvent":
        rec = {"event": "step", "canvas": event.canvas, "step": event.step, "steps": event.steps,
               "temperature": event.temperature, "stable": bool(event.stable),
               "elapsed_ms": round(event.elapsed_ms, 3), "argmax": event.argmax.tolist(),
               "accepted": [int(a) for a in event.accepted.tolist()],
               "entropy": [round(float(h), 6) for h in event.entropy.tolist()]}
    elif kind == "CanvasEvent":
        rec = {"event": "canvas", "canvas": event.canvas, "tokens": list(event.tokens),
               "canvas_ids": list(event.canvas_ids), "steps": event.steps, "ended": event.ended,
               "reason": event.reason, "elapsed_ms": round(event.elapsed_ms, 3)}
    else:
        rec = {"event": "done", "tokens": list(event.tokens), "stats": json_stats(event.stats)}
    fh.write(json.dumps(rec) + "\n")


def json_stats(st) -> dict[str, Any]:
    """The statistics of a turn as --json and the trace show them: every figure once (the seed
    and the prompt length are top-level fields of the reply object, not repeated here)."""
    return {k: v for k, v in st.to_dict().items() if k not in ("seed", "mode", "prompt_tokens")}


def report(session: Session, result: TurnResult) -> None:
    """End-of-turn output: --json's one object on stdout, or the statistics on stderr; both
    from the same GenerationStats."""
    opts, st = session.opts, result.stats
    if opts.json:
        obj = {"text": result.text if opts.show_thinking else result.answer,
               "thinking": result.thinking, "tokens": result.tokens, "seed": opts.seed,
               "prompt_tokens": result.prompt_tokens}
        if opts.conversation:
            obj["turn"] = session.turns
        obj["stats"] = json_stats(st)
        session.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        session.stdout.flush()
    if opts.no_perf:
        return
    for line in stats_lines(st, session.canvas_length):
        log(line)


def stats_lines(st, C: int) -> list[str]:
    """llama-diffusion-cli's two lines (§E), with its throughput counting the tokens the reply
    has rather than whole canvases (FIELD: its count is 256 per canvas however short the reply),
    then diffcli's line: time to the first canvas, prefill, why it stopped. Every figure comes
    from `st` (GenerationStats), as --json's do."""
    per_step, spb = st.ms_per_step, st.mean_steps_per_canvas
    parallel = 1000.0 * C / per_step if per_step > 0 else 0.0
    first = st.first_canvas_ms if st.first_canvas_ms is not None else 0.0
    return [
        f"total time: {st.total_ms:.2f}ms, time per step: {per_step:.2f}ms ({st.steps} steps over "
        f"{st.canvases} blocks, entropy-bound)",
        f"throughput: {st.tokens_per_s:.1f} tok/s ({st.emitted_tokens} tok in {st.total_ms:.2f}ms), "
        f"in-step parallel {parallel:.0f} tok/s ({C}-tok canvas x {spb:.1f} steps/block)",
        f"diffcli: first canvas after {first:.0f}ms; prefill {st.prefill_ms:.0f}ms "
        f"({st.prompt_tokens} tok); stop: {st.stop_reason}",
    ]
