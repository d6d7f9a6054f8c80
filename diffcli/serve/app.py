"""The HTTP side: Starlette routes for vLLM's OpenAI API (`/v1/chat/completions`,
`/v1/completions`, `/v1/models`), llama-server's `/health`, Prometheus `/metrics`, and the canvas
page at `/`.

A request is checked (API key, body size, JSON, types), turned into `Work` in a thread (templating
and tokenizing can take a while), queued as a `Job`, and answered once the worker starts it: a
JSON body, or an SSE stream (sse-starlette) with one text delta per committed canvas and, when
the request sets `diffusion_trace`, each step's draft canvas. A client that goes away while its
job waits or runs cancels it. Every error is an OpenAI error object.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from importlib import resources
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .protocol import ApiError, ChatRequest, CompletionRequest, now, parse, usage
from .runner import Settings, prepare_chat, prepare_completion
from .scheduler import Job, Scheduler


def create_app(mf, settings: Settings, scheduler: Scheduler) -> Starlette:
    """`mf`: the opened model file (tokenizer, template, sampler); the weights load separately
    and `scheduler.run` is set once they are in (until then /health answers 503)."""
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    created = now()
    name = settings.model_name

    def authorize(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key; send the header 'Authorization: "
                                "Bearer KEY' with the key given to --api-key", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        cap = settings.body_limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {cap}",
                           code="request_too_large")
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, f"the request body is over the limit of {cap} bytes",
                               code="request_too_large")
            body.append(chunk)
        return b"".join(body)

    async def home(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        if scheduler.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading", **ApiError(503, "Loading model", code="loading").body()},
                            status_code=503, headers={"Retry-After": "1"})

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "diffcli",
             "max_model_len": settings.context, "canvas_length": mf.canvas_length}]})

    async def metrics(request: Request) -> Response:
        authorize(request)
        st = scheduler.status()
        lines = ["# HELP diffcli_requests_total Requests by outcome.",
                 "# TYPE diffcli_requests_total counter"]
        lines += [f'diffcli_requests_total{{outcome="{k}"}} {v}' for k, v in st["requests"].items()]
        for key, kind, text in (("steps_total", "counter", "Denoising steps run."),
                                ("tokens_total", "counter", "Tokens emitted (after trimming)."),
                                ("waiting", "gauge", "Requests in the queue."),
                                ("running", "gauge", "Requests being generated."),
                                ("jobs_alive", "gauge", "Requests whose state is still in memory.")):
            lines += [f"# HELP diffcli_{key} {text}", f"# TYPE diffcli_{key} {kind}",
                      f"diffcli_{key} {st[key]}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def chat(request: Request) -> Response:
        authorize(request)
        req = parse(ChatRequest, await read_body(request))
        work = await run_in_threadpool(prepare_chat, mf, settings, req)
        return await answer(request, req, work, "chat")

    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse(CompletionRequest, await read_body(request))
        work = await run_in_threadpool(prepare_completion, mf, settings, req)
        return await answer(request, req, work, "completion")

    async def answer(request: Request, req, work, endpoint: str) -> Response:
        if not req.stream:
            work.trace = False
        job = Job(work, asyncio.get_running_loop(), "chatcmpl" if endpoint == "chat" else "cmpl")
        scheduler.submit(job)
        watch = asyncio.create_task(_disconnected(request))
        try:
            first = await _next(job, watch)               # waits in the queue
            if first is None:
                return Response(status_code=499)          # nobody is listening any more
            if first[0] == "error":
                raise first[1]
            if req.stream:
                watch.cancel()                            # sse-starlette watches from here on
                return EventSourceResponse(_events(job, req, endpoint), sep="\n", ping=15)
            return JSONResponse(await _collect(job, watch, req, endpoint))
        finally:
            watch.cancel()

    async def _collect(job: Job, watch: asyncio.Task, req, endpoint: str) -> dict[str, Any]:
        while True:
            item = await _next(job, watch)
            if item is None:
                return {}
            kind, p = item
            if kind == "error":
                raise p
            if kind == "done":
                return _final(job, req, endpoint, p)

    def _final(job: Job, req, endpoint: str, p: dict) -> dict[str, Any]:
        body = {"id": job.id, "created": now(), "model": name}
        choice = {"index": 0, "logprobs": None, "finish_reason": p["finish_reason"],
                  "stop_reason": p["stop_reason"]}
        if endpoint == "chat":
            reasoning = p["reasoning"] if req.include_reasoning and p["reasoning"] else None
            body["object"] = "chat.completion"
            choice["message"] = {"role": "assistant", "content": p["content"],
                                 "reasoning_content": reasoning}
        else:
            body["object"] = "text_completion"
            choice["text"] = p["content"]
        body["choices"] = [choice]
        body["usage"] = {**usage(p["prompt_tokens"], p["completion_tokens"]),
                         "prompt_tokens_details": {"cached_tokens": p["cached_tokens"]}}
        body["diffusion"] = p["stats"]
        return body

    async def _events(job: Job, req, endpoint: str):
        chat_ = endpoint == "chat"
        base = {"id": job.id, "object": "chat.completion.chunk" if chat_ else "text_completion",
                "created": now(), "model": name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def choice(finish=None, stop_reason=None, **fields):
            c = {"index": 0, **fields, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                c["stop_reason"] = stop_reason
            return c

        def text(content: str = "", reasoning: str = "", role: bool = False, **end):
            if not chat_:
                return choice(text=content, **end)
            delta = {"role": "assistant", "content": ""} if role else {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            return choice(delta=delta, **end)

        def data(obj) -> dict[str, str]:
            return {"data": json.dumps({**base, **obj}, ensure_ascii=False)}

        try:
            if chat_:
                yield data({"choices": [text(role=True)]})
            while True:
                kind, p = await job.get()
                if kind == "step":
                    yield data({"choices": [], "diffusion_step": p})
                elif kind == "canvas":
                    yield data({"choices": [], "diffusion_canvas": p})
                elif kind == "delta":
                    reasoning = p.reasoning if getattr(req, "include_reasoning", False) else ""
                    if reasoning or p.content:
                        yield data({"choices": [text(p.content, reasoning)]})
                elif kind == "done":
                    yield data({"choices": [text(finish=p["finish_reason"], stop_reason=p["stop_reason"])],
                                "diffusion": p["stats"]})
                    if include_usage:
                        yield data({"choices": [], "usage": {
                            **usage(p["prompt_tokens"], p["completion_tokens"]),
                            "prompt_tokens_details": {"cached_tokens": p["cached_tokens"]}}})
                    yield {"data": "[DONE]"}
                    return
                elif kind == "error":
                    yield {"data": json.dumps(p.body())}
                    yield {"data": "[DONE]"}
                    return
        finally:
            if not job.finished:
                job.cancel("client disconnected")

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
               f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return await on_api_error(request, ApiError(exc.status_code, msg))

    async def on_crash(request: Request, exc: Exception) -> Response:
        return await on_api_error(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    routes = [Route("/", home), Route("/health", health), Route("/metrics", metrics),
              Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={
        ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash})


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next(job: Job, watch: asyncio.Task):
    """The job's next item, or None (and the job cancelled) when the client leaves first."""
    get = asyncio.ensure_future(job.get())
    done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    job.cancel("client disconnected")
    return None

