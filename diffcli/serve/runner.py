"""From a validated request to generation and back: the prompt (chat template, thinking switch,
earlier thoughts stripped, images decoded and placed), the canvas count and token budget, the
sampler and seed (`prepare_*`, run on the event loop's side), and the generation itself (`Runner`,
run by the worker thread: the vision tower, then the loop), which turns the loop's events into the
items a request handler streams.

Images take the path `diffcli run --image` takes: each `image_url` data: URL is decoded and
prepared (media.image, bounded decode), the message becomes text and image parts that the chat
template renders and `encode_prompt_with_images` expands into `<|image>`, one `<|image|>` per soft
token, `<image|>`; the worker runs the tower (engine.images) and the soft tokens replace those
placeholders. Every image span carries its digest, so the prompt cache reuses a prefix only
where the images are the same.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.reply import Reply
from ..errors import InputError
from ..generation.events import CanvasEvent, StepEvent
from ..text.chat import Conversation, encode_prompt, encode_prompt_with_images, split_thinking
from .protocol import (SAMPLER_FIELDS, ApiError, ChatRequest, CompletionRequest, sampler_overrides,
                       stop_strings, token_budget)


# Images decoding at once, across requests: a decode may take 3 bytes a pixel up to 8192 x 8192
# (192 MiB) before the resize brings it down to the tower's budget, and requests prepare in threads.
_DECODING = threading.BoundedSemaphore(2)


@dataclass
class Settings:
    """What the server was started with (the `diffcli serve` flags)."""
    model_name: str
    context: int                           # tokens: prompt + canvases
    default_max_tokens: int | None = None  # None: fill the context, as vLLM does
    default_seed: int | None = None        # None: a fresh seed per request (reported back)
    thinking: bool = False                 # when a request does not say
    template_kwargs: dict = field(default_factory=dict)
    use_template: bool = True
    kv_cache: bool = True
    max_queue: int = 16
    max_body_bytes: int = 4 << 20
    api_key: str | None = None
    log_requests: bool = True
    # images (--mmproj): the tower's VisionConfig (read before the server listens), its file and
    # the soft-token budget per image; None: requests with images get a 400
    vision: Any = None
    mmproj: str | None = None
    image_max_tokens: int = 280
    max_image_body_bytes: int = 32 << 20   # the body limit when images are taken (base64 photos)

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes if self.vision is None else max(self.max_body_bytes,
                                                                   self.max_image_body_bytes)


@dataclass
class Work:
    """One generation, ready for the worker."""
    endpoint: str                          # "chat" | "completion"
    prompt_ids: list[int]
    canvases: int
    max_tokens: int | None
    stop: tuple[str, ...]
    sampler: Any
    seed: int
    reasoning: bool                        # split the thought channel into reasoning_content
    trace: bool                            # stream every step's draft canvas
    thinking: bool = False
    images: list = field(default_factory=list)   # (first soft token index, PreparedImage)


# ---- preparing (event-loop side, in a thread: templating and tokenizing can take a while) ------

def prepare_chat(mf, settings: Settings, req: ChatRequest) -> Work:
    kw = dict(settings.template_kwargs)
    asked = dict(req.chat_template_kwargs or {})
    kw.update(asked)
    if "enable_thinking" in asked:
        thinking = bool(asked["enable_thinking"])
    elif req.reasoning_effort is not None:                 # vLLM: "none" turns thinking off
        thinking = req.reasoning_effort != "none"
    else:
        thinking = bool(kw.get("enable_thinking", settings.thinking))
    kw.pop("enable_thinking", None)
    if req.reasoning_effort is not None:
        kw["reasoning_effort"] = req.reasoning_effort      # templates that know it can use it
    messages = [{"role": m.role, "content": _message_content(m, i, settings)}
                for i, m in enumerate(req.messages)]
    conv = Conversation(mf.template, mf.tokenizer, enable_thinking=thinking, template_kwargs=kw,
                        use_template=settings.use_template)
    conv.messages = messages
    try:
        text = conv.prompt_text()
    except InputError as exc:
        raise ApiError(400, exc.problem, param="messages") from None
    images = conv.images()
    slots: list = []
    if images:
        try:
            ids, slots = encode_prompt_with_images(mf.tokenizer, text, images)
        except InputError as exc:       # e.g. a literal <|image|> in the text, or a template without images
            raise ApiError(400, f"messages: {exc.message}", param="messages") from None
    else:
        ids = encode_prompt(mf.tokenizer, text)
    work = _work("chat", mf, settings, req, ids, reasoning=True, thinking=thinking)
    work.images = slots
    return work


def prepare_completion(mf, settings: Settings, req: CompletionRequest) -> Work:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = len(mf.tokenizer)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           param="prompt")
        ids = list(prompt)
    else:
        text = prompt[0] if isinstance(prompt, list) else prompt
        if not text:
            raise ApiError(400, "the prompt is empty", param="prompt")
        ids = encode_prompt(mf.tokenizer, text)
    return _work("completion", mf, settings, req, ids, reasoning=False, thinking=False)


def _message_content(m, i: int, settings: Settings):
    """A message's content as the chat template takes it: a string, or (a user message with
    images) text parts and image parts, each image decoded and prepared as `run --image` does."""
    if not isinstance(m.content, list) or all(p.type == "text" for p in m.content):
        return _message_text(m)
    parts = []
    for j, p in enumerate(m.content):
        if p.type == "text":
            parts.append({"type": "text", "text": p.text})
        else:
            parts.append({"type": "image", "image": _image(p, f"messages.{i}.content.{j}", settings)})
    return parts


def _image(part, where: str, settings: Settings):
    from ..engine.images import check_fits
    from ..media.dataurl import image_bytes_from_data_url
    from ..media.image import prepare_image

    cfg = settings.vision
    if cfg is None:
        raise ApiError(400, f"{where}: this server takes no images; start it with --mmproj FILE "
                            "(the model's vision tower, made with `diffcli convert HF_DIR --mmproj`)",
                       param=where)
    try:
        data = image_bytes_from_data_url(part.url)
    except InputError as exc:
        raise ApiError(400, f"{where}: {exc.message}", param=where) from None
    try:
        with _DECODING:
            img = prepare_image(data, cfg.patch_size, max_soft_tokens=settings.image_max_tokens,
                                pooling=cfg.pooling, name=where)
        check_fits(img, cfg)
    except InputError as exc:           # the message starts with `where` (the image's name)
        raise ApiError(400, exc.message, param=where) from None
    return img


def _message_text(m) -> str:
    if m.content is None:
        text = ""
    elif isinstance(m.content, str):
        text = m.content
    else:
        text = "".join(p.text for p in m.content)
    if m.role == "assistant":
        # earlier thoughts never go back into the prompt (FIELD trap 12), whatever the template does
        text = split_thinking(text)[1].strip()
    return text


def _work(endpoint: str, mf, settings: Settings, req, ids: list[int], *, reasoning: bool,
          thinking: bool) -> Work:
    C = mf.canvas_length
    room = (settings.context - len(ids)) // C
    if room < 1:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus one {C}-token canvas does not fit "
                            f"the context of {settings.context} tokens; shorten the messages",
                       param="messages" if endpoint == "chat" else "prompt",
                       code="context_length_exceeded")
    budget = token_budget(req)
    if budget is None:
        budget = settings.default_max_tokens
    if budget is None:
        canvases, max_tokens = room, None
    else:
        canvases, max_tokens = math.ceil(budget / C), budget
        if canvases > room:
            raise ApiError(400, f"max_tokens={budget} needs {canvases} canvases of {C} tokens after "
                                f"the {len(ids)}-token prompt, but the context of {settings.context} "
                                f"tokens holds {room}; ask for at most {room * C}",
                           param="max_tokens", code="context_length_exceeded")
    try:
        sampler = dataclasses.replace(mf.sampler, **sampler_overrides(req))
    except InputError as exc:          # SamplerConfig names the setting: "... t_min=0.9 ..."
        name = exc.problem.split("=")[0].split()[-1]
        param = next((f for f, n in SAMPLER_FIELDS.items() if n == name), None)
        raise ApiError(400, f"{param or 'sampler'}: {exc.problem}", param=param) from None
    seed = req.seed
    if seed is None:
        seed = settings.default_seed
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    return Work(endpoint, ids, canvases, max_tokens, stop_strings(req), sampler, int(seed),
                reasoning=reasoning, trace=req.diffusion_trace, thinking=thinking)


# ---- running (worker thread) ------------------------------------------------------------------

class Runner:
    """Runs a job's Work on the loaded model and emits what its handler streams."""

    def __init__(self, model, tokenizer, canvas_length: int, *, kv_cache: bool = True,
                 log: Callable[[str], None] | None = None, vision=None, keep_images: int = 32):
        from ..engine.images import ImageEmbedder
        self.model = model
        self.tokenizer = tokenizer
        self.C = canvas_length
        self.kv_cache = kv_cache
        self.log = log
        self._pieces: dict[int, str] = {}
        # the tower's soft tokens of the most recent images, by digest (a chat resends them)
        self.images = ImageEmbedder(vision, keep=keep_images) if vision is not None else None

    def piece(self, i: int) -> str:
        if i not in self._pieces:
            self._pieces[i] = self.tokenizer.piece(i)
        return self._pieces[i]

    def __call__(self, job) -> str:
        from ..generation.loop import stream

        w, tok = job.work, self.tokenizer
        reply = Reply(tok, max_tokens=w.max_tokens, stop=w.stop, reasoning=w.reasoning)
        reused0 = getattr(self.model, "reused_tokens", 0)
        t0 = time.perf_counter()
        prefill_ms = first_canvas_ms = None
        step_ms, steps_per_canvas = 0.0, []
        spans = {}
        if w.images:
            if self.images is None:     # prepare_chat refuses images without a tower; never here
                raise ApiError(400, "this server takes no images; start it with --mmproj FILE")
            spans = {"images": self.images.spans(w.images)}
        image_ms = _ms(t0)
        events = stream(self.model, w.prompt_ids, max_new_tokens=w.canvases * self.C,
                        sampler=w.sampler, seed=w.seed, mode="cli", kv_cache=self.kv_cache,
                        eog_ids=tok.eog_ids, pad_id=tok.pad_id or 0, **spans)
        try:
            for ev in events:
                if isinstance(ev, StepEvent):
                    job.steps += 1
                    step_ms += ev.elapsed_ms
                    if prefill_ms is None:      # time before the first step: encoding the prompt
                        prefill_ms = _ms(t0) - ev.elapsed_ms - (image_ms if w.images else 0.0)
                    if w.trace:
                        job.emit("step", self.step_payload(ev))
                elif isinstance(ev, CanvasEvent):
                    steps_per_canvas.append(ev.steps)
                    if first_canvas_ms is None:
                        first_canvas_ms = _ms(t0)
                    delta = reply.feed(ev.tokens, ev.ended, ev.reason)
                    job.tokens = reply.completion_tokens
                    if w.trace:
                        job.emit("canvas", {"canvas": ev.canvas, "steps": ev.steps,
                                            "emitted": reply.completion_tokens,
                                            "in_thought": reply.in_thought})
                    if delta:
                        job.emit("delta", delta)
                    if reply.finished:
                        break
                if job.cancelled:
                    break
        finally:
            events.close()                       # stops the loop between steps
        total_ms = _ms(t0)
        if job.cancelled:
            if self.log is not None:
                after = job.steps - (job.steps_at_cancel or 0)
                self.log(f"diffcli serve: {job.id} cancelled ({job.cancel_reason}) after {job.steps} "
                         f"steps, {after} after the cancel")
            return "cancelled"
        steps = sum(steps_per_canvas)
        n = reply.completion_tokens
        stats = {"seed": w.seed, "canvases": len(steps_per_canvas), "steps": steps,
                 "steps_per_canvas": steps_per_canvas,
                 "ms_per_step": round(step_ms / steps, 3) if steps else 0.0,
                 "prefill_ms": round(prefill_ms or 0.0, 3),
                 "first_canvas_ms": round(first_canvas_ms or 0.0, 3),
                 "total_ms": round(total_ms, 3),
                 "queue_ms": round(1000.0 * (job.t_start - job.t_submit), 3),
                 "emitted_tokens": n,
                 "tokens_per_s": round(1000.0 * n / total_ms, 3) if total_ms > 0 else 0.0,
                 "stop": reply.cause, "thinking": w.thinking,
                 "images": len(w.images), "image_ms": round(image_ms, 3) if w.images else 0.0}
        cached = getattr(self.model, "reused_tokens", 0) - reused0
        job.emit("done", {"finish_reason": reply.finish_reason, "stop_reason": reply.stop_match,
                          "prompt_tokens": len(w.prompt_ids), "completion_tokens": n,
                          "cached_tokens": cached, "content": reply.content,
                          "reasoning": reply.reasoning, "stats": stats})
        if self.log is not None:
            pics = f", {len(w.images)} image{'s' * (len(w.images) != 1)}" if w.images else ""
            self.log(f"diffcli serve: {job.id} {w.endpoint}: prompt {len(w.prompt_ids)} tok "
                     f"({cached} cached{pics}), emitted {n} tok in {len(steps_per_canvas)} canvases, "
                     f"{steps} steps, {stats['ms_per_step']:.1f} ms/step, "
                     f"{stats['tokens_per_s']:.1f} tok/s, queued {stats['queue_ms']:.0f} ms, "
                     f"stop: {reply.cause}")
        return "ok"

    def step_payload(self, ev: StepEvent) -> dict[str, Any]:
        ids = [int(i) for i in ev.argmax.tolist()]
        return {"canvas": ev.canvas, "step": ev.step, "steps": ev.steps, "argmax": ids,
                "pieces": [self.piece(i) for i in ids],
                "accepted": [int(a) for a in ev.accepted.tolist()],
                "entropy": [round(float(h), 4) for h in ev.entropy.tolist()],
                "temperature": round(float(ev.temperature), 4), "stable": bool(ev.stable),
                "elapsed_ms": round(float(ev.elapsed_ms), 3)}


def _ms(t0: float) -> float:
    return 1000.0 * (time.perf_counter() - t0)
