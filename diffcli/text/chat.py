"""Chat: the GGUF's Jinja chat template, thinking on/off, and the conversation history.

The template is rendered with jinja2 the way transformers 5.23.0 renders it (spec §D.3): an
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
extension, `raise_exception` and `strftime_now` globals and a `tojson` filter that does not
HTML-escape. When the file carries no template, `GEMMA4_TEMPLATE` (written for diffcli after the
structure in §D.3) is used.

Thinking is off by default (transformers and the model card; llama.cpp's runner defaults it on).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import InputError
from .sandbox import RenderState, TemplateLimitError, TemplateLimits, environment, one_line

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
        env = environment()
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
            raise InputError(f"the chat template does not parse: {one_line(exc)}", path=path,
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
        state = RenderState(self.limits, _input_chars(ctx))
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
            raise InputError(f"the chat template failed to render: {one_line(exc)}",
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
