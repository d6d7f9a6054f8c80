"""Chat: the GGUF's Jinja chat template, thinking on/off, and the conversation history.

The template is rendered with jinja2 the way transformers 5.23.0 renders it (spec §D.3): an
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
extension, `raise_exception` and `strftime_now` globals and a `tojson` filter that does not
HTML-escape. When the file carries no template, `GEMMA4_TEMPLATE` (written for diffcli after the
structure in §D.3) is used.

Thinking is off by default (transformers and the model card; llama.cpp's runner defaults it on).
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from ..errors import InputError

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
# Gemma 4's image tokens: begin, the placeholder a template writes (one per soft token once
# expanded), end; and llama-mtmd-cli's marker for where an image goes in a prompt
IMAGE_BEGIN, IMAGE_MARKER, IMAGE_END = "<|image>", "<|image|>", "<image|>"
MEDIA_MARKER = "<__media__>"

# diffcli's own Gemma-4-shaped template (spec §D.3): BOS; a system turn when thinking is on, tools
# are given or the first message is a system/developer message; one `<|turn>role ... <turn|>` per
# message with `assistant` renamed `model` and earlier thoughts stripped from model messages; the
# generation prompt, which pre-closes an empty thought channel when thinking is off. An image part
# renders as Gemma 4's template renders it: `\n\n<|image|>\n\n`.
GEMMA4_TEMPLATE = r"""{%- macro content_text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}
{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro user_text(content) -%}
{%- if content is string -%}{{ content | trim }}
{%- elif content is iterable -%}
{%- for part in content -%}
{%- if part.type == 'text' -%}{{ part.text | trim }}
{%- elif part.type == 'image' -%}{{ '\n\n<|image|>\n\n' }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
{%- set parts = text.split('<|channel>') -%}
{%- set ns = namespace(kept=parts[0]) -%}
{%- for part in parts[1:] if '<channel|>' in part -%}
{%- set ns.kept = ns.kept + part.split('<channel|>', 1)[1] -%}
{%- endfor -%}
{{ ns.kept | trim }}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set rest = messages -%}
{%- set system = none -%}
{%- if messages and messages[0].role in ['system', 'developer'] -%}
{%- set system = content_text(messages[0].content) -%}
{%- set rest = messages[1:] -%}
{%- endif -%}
{{ bos_token }}
{%- if thinking or tools or system is not none -%}
{{ '<|turn>system\n' }}
{%- if thinking -%}{{ '<|think|>' }}{%- endif -%}
{%- if system is not none -%}{{ system | trim }}{%- endif -%}
{%- for tool in tools or [] -%}
{{ '<|tool>declaration:' + (tool.function if tool.function is defined else tool) | tojson + '<tool|>' }}
{%- endfor -%}
{{ '<turn|>\n' }}
{%- endif -%}
{%- for message in rest -%}
{%- set role = 'model' if message.role == 'assistant' else message.role -%}
{%- if role == 'model' -%}
{%- set text = strip_thinking(content_text(message.content)) -%}
{%- else -%}
{%- set text = user_text(message.content) -%}
{%- endif -%}
{{ '<|turn>' + role + '\n' + text + '<turn|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|turn>model\n' }}
{%- if not thinking -%}{{ '<|channel>thought\n<channel|>' }}{%- endif -%}
{%- endif -%}
"""


class TemplateLimits:
    """What one render may spend. A chat template is code from the model file: the sandbox keeps
    it from reaching anything, these keep it from running for ever or filling the memory.

    `steps` counts loop iterations, calls and checked operators; `chars` is the longest string or
    list any checked operation (`*`, `+`, `~`, `%`, string methods and filters, the output) may
    make, and `budget` what they may make in all; both grow with the size of the messages so a
    long prompt is never refused for being long. `seconds` bounds the wall time."""

    steps = 250_000
    chars = 1 << 22
    budget = 1 << 26
    seconds = 1.0
    int_bits = 1 << 16           # integers from `*` and `**`
    range = 100_000              # the sandbox's own limit on range()


class _RenderState:
    def __init__(self, limits, input_chars: int):
        self.steps = 0
        self.max_steps = limits.steps
        self.chars = max(limits.chars, 4 * input_chars)
        self.budget = max(limits.budget, 32 * input_chars)
        self.int_bits = limits.int_bits
        self.deadline = time.monotonic() + limits.seconds
        self.seconds = limits.seconds


class TemplateLimitError(Exception):
    """A render went over a TemplateLimits bound (becomes an InputError in render)."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else 0


def _guarded_environment():
    """jinja2's ImmutableSandboxedEnvironment (what transformers renders with), made to count:
    every for-loop iterable and every `~` concatenation pass through the environment (a code
    generator that wraps them), calls, filters and the `* ** + %` operators are checked before
    they run, and includes / imports / extends are refused at compile time."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generator(CodeGenerator):
        """Writes `environment.guard_iter(...)` around every for-loop's iterable and
        `environment.guard_size(...)` around every `~` concatenation."""

        def visit(self, node, *args, **kwargs):
            if id(node) in getattr(self, "_loop_iters", ()):
                self.write("environment.guard_iter(")
                super().visit(node, *args, **kwargs)
                self.write(")")
                return None
            return super().visit(node, *args, **kwargs)

        def visit_For(self, node, frame):
            if not hasattr(self, "_loop_iters"):
                self._loop_iters = set()
            self._loop_iters.add(id(node.iter))
            super().visit_For(node, frame)

        def visit_Concat(self, node, frame):
            self.write("environment.guard_size(")
            super().visit_Concat(node, frame)
            self.write(")")

    class Environment(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, **kw):
            super().__init__(**kw)
            self._local = threading.local()
            self.globals["range"] = self.guard_range
            for name, fn in list(self.filters.items()):
                self.filters[name] = self._guard_filter(fn)

        # -- state of the render in progress (none while compiling: then only sizes count) --
        @property
        def state(self) -> _RenderState | None:
            return getattr(self._local, "state", None)

        def step(self, n: int = 1) -> None:
            st = self.state
            if st is None:
                return
            st.steps += n
            if st.steps > st.max_steps:
                raise TemplateLimitError(f"it ran more than {st.max_steps:,} loop iterations "
                                         "and calls")
            if not st.steps & 1023 and time.monotonic() > st.deadline:
                raise TemplateLimitError(f"it ran longer than {st.seconds:g} s")

        def charge(self, n: int) -> None:
            st = self.state
            limit = st.chars if st else TemplateLimits.chars
            if n > limit:
                raise TemplateLimitError(f"it made a string or list of {n:,} items (at most "
                                         f"{limit:,})")
            if st is not None:
                st.budget -= n
                if st.budget < 0:
                    raise TemplateLimitError("it made more text and lists than its budget allows")

        def limit_int(self, n: int, what: str) -> None:
            st = self.state
            limit = st.chars if st else TemplateLimits.chars
            if abs(n) > limit:
                raise TemplateLimitError(f"{what} {n:,} is too large (at most {limit:,})")

        # -- hooks the generated code calls --
        def guard_iter(self, iterable):
            st = self.state
            if st is None:
                yield from iterable
                return
            for item in iterable:
                st.steps += 1
                if st.steps > st.max_steps or not st.steps & 1023:
                    self.step(0)
                yield item

        def guard_size(self, value):
            self.step()
            self.charge(_size(value))
            return value

        def guard_range(self, *args):
            r = range(*args)
            if len(r) > TemplateLimits.range:
                raise TemplateLimitError(f"range() of {len(r):,} numbers (at most "
                                         f"{TemplateLimits.range:,})")
            return r

        def call_binop(self, context, operator, left, right):
            self.step()
            bits = TemplateLimits.int_bits
            ints = type(left) is int and type(right) is int
            if operator == "*":
                if ints and left.bit_length() + right.bit_length() > bits:
                    raise TemplateLimitError(f"an integer product of more than {bits:,} bits")
                for seq, n in ((left, right), (right, left)):
                    if _size(seq) and isinstance(n, int):
                        self.charge(_size(seq) * max(n, 0))
            elif operator == "**":
                if ints and right > 0 and abs(left) > 1 and left.bit_length() * right > bits:
                    raise TemplateLimitError(f"an integer power of more than {bits:,} bits")
            elif operator == "+":
                if _size(left) and _size(right):
                    self.charge(_size(left) + _size(right))
            elif operator == "%" and isinstance(left, str):
                self._check_format(left, right if isinstance(right, tuple) else (right,))
            out = super().call_binop(context, operator, left, right)
            if operator == "%":
                self.charge(_size(out))
            return out

        def _check_format(self, fmt: str, args) -> None:
            for width in re.findall(r"\d+", fmt):
                if len(width) > 9 or int(width) > (self.state.chars if self.state else
                                                   TemplateLimits.chars):
                    raise TemplateLimitError(f"a format width of {width} characters")
            for a in args if isinstance(args, (tuple, list)) else (args,):
                if type(a) is int:
                    self.limit_int(a, "a format argument")

        def call(__self, __context, __obj, *args, **kwargs):
            __self.step()
            # the sandbox hands str.format out wrapped (functools.update_wrapper)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, (str, list, tuple, dict)):
                name = getattr(__obj, "__name__", "")
                for a in (*args, *kwargs.values()):
                    if type(a) is int:
                        __self.limit_int(a, f"the argument of {name}()")
                if name in ("format", "format_map") and isinstance(owner, str):
                    __self._check_format(owner, ())
                if name == "replace" and isinstance(owner, str) and len(args) >= 2:
                    __self.charge(len(owner) * (1 + _size(args[1])))
                if name == "join":
                    __self.charge(sum(map(_size, args[0])) if args and isinstance(
                        args[0], (list, tuple)) else 0)
            out = super().call(__context, __obj, *args, **kwargs)
            __self.charge(_size(out))
            return out

        def _guard_filter(self, fn):
            env = self

            from jinja2.utils import _PassArg
            first = 0 if _PassArg.from_obj(fn) is None else 1     # context / environment first
            name = fn.__name__.removeprefix("do_")

            @functools.wraps(fn)
            def guarded(*args, **kwargs):
                env.step()
                for a in (*args[first + 1:], *kwargs.values()):
                    if type(a) is int:
                        env.limit_int(a, f"the argument of the {name} filter")
                value = args[first] if len(args) > first else None
                if name == "replace" and len(args) > first + 2:
                    env.charge(_size(str(value)) * (1 + _size(args[first + 2])))
                elif name == "join" and isinstance(value, (list, tuple)):
                    env.charge(sum(_size(x) if isinstance(x, str) else 8 for x in value))
                elif name == "format":
                    env._check_format(str(value), args[first + 1:])
                out = fn(*args, **kwargs)
                env.charge(_size(out))
                return out
            return guarded

        def guard_template(self, source: str):
            """Parse `source`, refuse what a chat template must not do, wrap every loop."""
            tree = self.parse(source)
            for kind, word in ((nodes.Include, "include"), (nodes.Import, "import"),
                               (nodes.FromImport, "from ... import"), (nodes.Extends, "extends")):
                for _ in tree.find_all(kind):
                    raise TemplateLimitError(f"it uses {{% {word} %}}; a chat template must be "
                                             "self-contained")
            return self.from_string(tree)

    return Environment


_ENVIRONMENT_CLASS = None


def _environment():
    global _ENVIRONMENT_CLASS
    from jinja2.ext import loopcontrols

    if _ENVIRONMENT_CLASS is None:
        _ENVIRONMENT_CLASS = _guarded_environment()

    def raise_exception(message: str):
        raise InputError(f"chat template error: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators=None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = _ENVIRONMENT_CLASS(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = env._guard_filter(tojson)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, TemplateLimitError) else text


_COMPILED: dict[str, tuple[Any, Any]] = {}    # source -> (environment, template): compiling is ~0.1 s


class ChatTemplate:
    """A compiled chat template. `render(messages, ...)` returns the prompt text.

    The template comes from the model file, so it is treated as untrusted code: it runs in
    jinja2's immutable sandbox, within `limits` (TemplateLimits: steps, sizes, seconds), and any
    way it fails, to compile or to render, is one InputError."""

    max_source = 1 << 20          # characters of template source

    def __init__(self, source: str | None, *, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 path: str | None = None, limits: type[TemplateLimits] | TemplateLimits = TemplateLimits):
        self.source = source or GEMMA4_TEMPLATE
        self.builtin = not source
        self.bos_token, self.eos_token, self.path = bos_token, eos_token, path
        self.limits = limits
        fix = "pass --chat-template-file with a working template, or --no-chat-template"
        if not isinstance(self.source, str):
            raise InputError(f"the chat template is a {type(self.source).__name__}, not text",
                             path=path, fix=fix)
        if len(self.source) > self.max_source:
            raise InputError(f"the chat template has {len(self.source):,} characters (at most "
                             f"{self.max_source:,})", path=path, fix=fix)
        cached = _COMPILED.get(self.source)
        if cached is not None:
            self._env, self._template = cached
            return
        env = _environment()
        try:
            self._template = env.guard_template(self.source)
        except InputError:
            raise
        except TemplateLimitError as exc:
            raise InputError(f"the chat template is refused: {exc}", path=path, fix=fix) from None
        except RecursionError:
            raise InputError("the chat template does not parse: it nests too deeply", path=path,
                             fix=fix) from None
        except Exception as exc:    # jinja2.TemplateSyntaxError, or Python's compile refusing it
            raise InputError(f"the chat template does not parse: {_one_line(exc)}", path=path,
                             fix=fix) from None
        self._env = env
        if len(_COMPILED) >= 8:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[self.source] = (env, self._template)

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
               enable_thinking: bool = False, tools: list | None = None, **extra: Any) -> str:
        ctx = dict(extra)
        ctx.update(messages=list(messages), add_generation_prompt=add_generation_prompt,
                   bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        if enable_thinking:    # leave it undefined otherwise, as transformers does
            ctx["enable_thinking"] = True
        state = _RenderState(self.limits, _input_chars(ctx))
        local = self._env._local
        outer = getattr(local, "state", None)
        local.state = state
        fix = "check the messages, or pass --no-chat-template"
        try:
            out, n = [], 0
            for chunk in self._template.generate(**ctx):
                n += len(chunk)
                if n > state.chars:
                    raise TemplateLimitError(f"its output is longer than {state.chars:,} characters")
                self._env.step()
                out.append(chunk)
            return "".join(out)
        except InputError:
            raise
        except TemplateLimitError as exc:
            raise InputError(f"the chat template was stopped: {exc}", path=self.path,
                             fix=fix) from None
        except RecursionError:
            raise InputError("the chat template failed to render: it recursed too deeply",
                             path=self.path, fix=fix) from None
        except MemoryError:
            raise InputError("the chat template failed to render: out of memory", path=self.path,
                             fix=fix) from None
        except Exception as exc:   # anything the template's own code raised
            raise InputError(f"the chat template failed to render: {_one_line(exc)}",
                             path=self.path, fix=fix) from None
        finally:
            local.state = outer


def _input_chars(ctx: dict) -> int:
    """Characters of text the caller hands the template (messages, tools, extra values)."""
    total, todo, seen = 0, [ctx], 0
    while todo and seen < 1_000_000:
        v = todo.pop()
        seen += 1
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
    return total


def split_thinking(text: str) -> tuple[str, str]:
    """Reply text -> (thinking, answer). `<|channel>NAME\\n...<channel|>` spans are the thought
    channel (the channel name line is dropped); an unclosed channel runs to the end."""
    thought, answer, pos = [], [], 0
    while True:
        i = text.find(CHANNEL_OPEN, pos)
        if i < 0:
            answer.append(text[pos:])
            break
        answer.append(text[pos:i])
        j = text.find(CHANNEL_CLOSE, i)
        body = text[i + len(CHANNEL_OPEN): j if j >= 0 else len(text)]
        name, nl, rest = body.partition("\n")
        thought.append(rest if nl and name.strip().isidentifier() else body)
        if j < 0:
            break
        pos = j + len(CHANNEL_CLOSE)
    return "".join(thought).strip(), "".join(answer)


@dataclass
class Conversation:
    """Chat history rendered to token ids; the system prompt survives /clear."""

    template: ChatTemplate
    tokenizer: Any
    system: str | None = None
    enable_thinking: bool = False
    template_kwargs: dict = field(default_factory=dict)
    use_template: bool = True
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def add_user(self, text: str, images: Sequence[Any] = ()) -> None:
        """A user turn; with `images` (objects with `n_tokens`, e.g. media.image.PreparedImage)
        its content is a list of parts: the images where the text has `<__media__>` markers
        (llama-mtmd-cli's), else all before the text."""
        if not images:
            self.messages.append({"role": "user", "content": text})
            return
        self.messages.append({"role": "user", "content": media_parts(text, images)})

    def add_reply(self, answer: str) -> None:
        self.messages.append({"role": "assistant", "content": answer})

    def drop_last_user(self) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def prompt_text(self) -> str:
        if not self.use_template:   # raw mode: the texts as they are, one after the other
            return "\n".join(m["content"] if isinstance(m["content"], str) else
                             "".join(p["text"] if p["type"] == "text" else f"\n\n{IMAGE_MARKER}\n\n"
                                     for p in m["content"]) for m in self.messages)
        kw = dict(self.template_kwargs)
        thinking = bool(kw.pop("enable_thinking", self.enable_thinking))
        return self.template.render(self.messages, enable_thinking=thinking, **kw)

    def prompt_ids(self) -> list[int]:
        return self.prompt()[0]

    def images(self) -> list[Any]:
        """Every image of the history, in prompt order."""
        return [p["image"] for m in self.messages if not isinstance(m["content"], str)
                for p in m["content"] if p["type"] == "image"]

    def prompt(self) -> tuple[list[int], list[tuple[int, Any]]]:
        """The rendered prompt's ids and, for each image, (index of its first soft token, image)."""
        return encode_prompt_with_images(self.tokenizer, self.prompt_text(), self.images())


def media_parts(text: str, images: Sequence[Any]) -> list[dict]:
    """Content parts of a user message with images (see `Conversation.add_user`)."""
    pieces = text.split(MEDIA_MARKER)
    if len(pieces) == 1:
        return [{"type": "image", "image": img} for img in images] + [{"type": "text", "text": text}]
    if len(pieces) - 1 != len(images):
        raise InputError(f"the prompt has {len(pieces) - 1} {MEDIA_MARKER} markers for "
                         f"{len(images)} images", fix=f"give one {MEDIA_MARKER} per --image, or none")
    parts: list[dict] = []
    for k, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if k < len(images):
            parts.append({"type": "image", "image": images[k]})
    return parts


def encode_prompt_with_images(tokenizer, text: str, images: Sequence[Any]
                              ) -> tuple[list[int], list[tuple[int, Any]]]:
    """Tokenize a rendered prompt whose images stand as `<|image|>` markers (as the template
    renders them): each marker becomes `<|image>`, one `<|image|>` per soft token, `<image|>`, as
    transformers' Gemma 4 processor expands it. Returns (ids, [(first soft token index, image)])."""
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(images):
        raise InputError(f"the rendered prompt has {len(pieces) - 1} image markers for "
                         f"{len(images)} images", fix=f"do not write {IMAGE_MARKER} in the prompt text"
                         if len(pieces) - 1 > len(images) else "the chat template drops images; "
                         "use the model's own template")
    if not images:
        return encode_prompt(tokenizer, text), []
    boi, image, eoi = (tokenizer.token_to_id(t) for t in (IMAGE_BEGIN, IMAGE_MARKER, IMAGE_END))
    if None in (boi, image, eoi):
        raise InputError(f"the model's vocabulary has no {IMAGE_BEGIN} / {IMAGE_MARKER} / "
                         f"{IMAGE_END} tokens, so it cannot take images",
                         fix="use a Gemma 4 / DiffusionGemma model file")
    ids = encode_prompt(tokenizer, pieces[0])
    slots = []
    for img, piece in zip(images, pieces[1:]):
        ids.append(boi)
        slots.append((len(ids), img))
        ids += [image] * int(img.n_tokens) + [eoi]
        ids += tokenizer.encode(piece, add_bos=False, parse_special=True)
    return ids, slots


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Tokenize a rendered prompt with exactly one BOS in front (the template writes `<bos>` as
    text; the vocabulary would add another)."""
    ids = tokenizer.encode(text, add_bos=False, parse_special=True)
    bos = tokenizer.bos_id
    if bos is None:
        return ids
    while ids and ids[0] == bos:
        ids = ids[1:]
    return [bos] + ids if tokenizer.add_bos or text.startswith(tokenizer.id_to_token(bos)) else ids
