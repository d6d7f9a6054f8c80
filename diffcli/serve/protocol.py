"""The OpenAI wire format: request bodies (validated strictly: a wrong type is a 400, never a
silent coercion), error objects, and the response and stream-chunk shapes.

Fields follow OpenAI's API and vLLM's extensions to it (`reasoning_content`, `chat_template_kwargs`,
`include_reasoning`); diffcli's own fields are named like the `diffcli run` flags
(`diffusion_eb_max_steps`, ...). Standard sampling fields that the entropy-bound sampler has no use
for (`temperature`, `top_p`, penalties) are checked and ignored, as `--temp` is on the command line.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The sampler settings a request may set, by body field -> SamplerConfig name.
SAMPLER_FIELDS = {
    "diffusion_eb_max_steps": "max_steps", "diffusion_eb_t_max": "t_max",
    "diffusion_eb_t_min": "t_min", "diffusion_eb_entropy_bound": "entropy_bound",
    "diffusion_eb_stability": "stability", "diffusion_eb_confidence": "confidence",
}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024       # each: held-back prefixes are checked against every new canvas
MAX_IMAGES = 16             # per request (a chat resends its earlier images with every turn)


class ApiError(Exception):
    """An error the client gets as an OpenAI error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
             503: "unavailable_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class ImageUrl(_Body):
    url: str
    detail: str | None = None          # accepted; the image budget is the server's --image-max-tokens


class ContentPart(_Body):
    """A part of a message's content: `{"type": "text", "text": ...}` or `{"type": "image_url",
    "image_url": {"url": "data:image/png;base64,..."}}` (the URL may also be a plain string)."""
    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None

    @property
    def url(self) -> str | None:
        return self.image_url.url if isinstance(self.image_url, ImageUrl) else self.image_url


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    """Fields both endpoints share."""
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    n: int = 1
    # accepted and ignored: the entropy-bound sampler has its own temperature schedule
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # diffcli: the sampler's settings, named like the flags, and the step stream (for UIs)
    diffusion_eb_max_steps: int | None = Field(default=None, ge=1)
    diffusion_eb_t_max: float | None = None
    diffusion_eb_t_min: float | None = None
    diffusion_eb_entropy_bound: float | None = None
    diffusion_eb_stability: int | None = None
    diffusion_eb_confidence: float | None = None
    diffusion_trace: bool = False


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


def parse(model: type[_Body], raw: bytes) -> _Body:
    """Body bytes -> a validated request, or a 400 that names the field."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} (line {exc.lineno} "
                            f"column {exc.colno})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(k for k in obj if k.startswith("diffusion_") and k not in model.model_fields)
    if unknown:
        known = ", ".join([*SAMPLER_FIELDS, "diffusion_trace"])
        raise ApiError(400, f"unknown field {unknown[0]!r}; diffcli's fields are {known}",
                       param=unknown[0])
    try:
        req = model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ApiError(400, f"{where}: {err['msg']}", param=where) from None
    check(req)
    return req


def check(req: _Body) -> None:
    """What the types alone do not say."""
    if req.n != 1:
        raise ApiError(400, "n must be 1: one reply per request", param="n")
    stops = stop_strings(req)
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "a stop string must not be empty", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    if isinstance(req, ChatRequest):
        if req.logprobs or req.top_logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if req.tools:
            raise ApiError(400, "tool calls are not supported yet", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported",
                           param="response_format")
        if req.reasoning_effort is not None and req.reasoning_effort not in REASONING_EFFORTS:
            raise ApiError(400, f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}",
                           param="reasoning_effort")
        for i, m in enumerate(req.messages):
            if m.role not in ("system", "developer", "user", "assistant"):
                raise ApiError(400, f"messages.{i}.role: {m.role!r} messages are not supported "
                                    "(use system, developer, user or assistant)",
                               param=f"messages.{i}.role")
            if m.tool_calls:
                raise ApiError(400, "tool calls are not supported yet", param=f"messages.{i}.tool_calls")
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                where = f"messages.{i}.content.{j}"
                if part.type == "text":
                    if part.text is None:
                        raise ApiError(400, f"{where}: a text part needs a \"text\" string", param=where)
                elif part.type == "image_url":
                    check_image_part(part, m.role, where)
                else:
                    raise ApiError(400, f"{where}: only text and image_url parts are supported "
                                        f"(got {part.type!r})", param=where)
        n_images = len(image_parts(req))
        if n_images > MAX_IMAGES:
            raise ApiError(400, f"the messages have {n_images} images; a request may have at most "
                                f"{MAX_IMAGES}", param="messages")
    else:
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if req.suffix:
            raise ApiError(400, "suffix (insertion) is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of must be 1", param="best_of")
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) \
                and len(req.prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        if isinstance(req.prompt, list) and not req.prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")


def check_image_part(part: ContentPart, role: str, where: str) -> None:
    """What can be told about an image part without decoding it (that happens off the event loop)."""
    if role != "user":
        raise ApiError(400, f"{where}: images are taken in user messages only (this is a {role} "
                            "message)", param=where)
    url = part.url
    if not url:
        raise ApiError(400, f"{where}: an image_url part needs {{\"url\": \"data:image/...;base64,...\"}}",
                       param=where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        got = f", not a {scheme}: URL" if scheme.isalpha() and len(scheme) <= 16 else ""
        raise ApiError(400, f"{where}: image_url must be a data: URL{got}; diffcli fetches nothing "
                            "from the network: send the image inline as data:image/png;base64,...",
                       param=where)


def image_parts(req: _Body) -> list[tuple[int, int, ContentPart]]:
    """(message index, part index, part) of every image part of a chat request, in order."""
    return [(i, j, p) for i, m in enumerate(getattr(req, "messages", ()))
            if isinstance(m.content, list) for j, p in enumerate(m.content) if p.type == "image_url"]


def stop_strings(req: _Body) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def token_budget(req: _Body) -> int | None:
    chat_max = getattr(req, "max_completion_tokens", None)
    return chat_max if chat_max is not None else req.max_tokens


def sampler_overrides(req: _Body) -> dict[str, Any]:
    return {name: getattr(req, f) for f, name in SAMPLER_FIELDS.items() if getattr(req, f) is not None}


# ---- responses ---------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
