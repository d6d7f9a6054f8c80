"""`diffcli serve` as a real process on 127.0.0.1 (a free port the server picks itself), the
official openai client pointed at it, a raw HTTP helper for the requests no client would send, and
the reference generation the server's replies are checked against."""
from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import diffcli
from diffcli.text.chat import ChatTemplate, Conversation, split_thinking
from diffcli.text.tokenizer import Tokenizer

HOST = "127.0.0.1"
# the tiny model with 2 steps per canvas, one thread (on 2 shared cores a second torch thread
# only fights the event loop): every request is a few tens of milliseconds
FAST = ["--device", "cpu", "--dtype", "f32", "--diffusion-eb-max-steps", "2", "-t", "1"]
# per-request fields that make a request slow on purpose: every step of every canvas runs
SLOW = {"diffusion_eb_max_steps": 48, "diffusion_eb_confidence": 0.0}


class ServerProcess:
    """`python -m diffcli serve ...` with its stderr collected line by line."""

    def __init__(self, model: Path, *args: str, ready: bool = True, timeout: float = 90.0):
        cmd = [sys.executable, "-m", "diffcli", "serve", "-m", str(model), "--host", HOST,
               "--port", "0", *args]
        env = {k: v for k, v in os.environ.items() if k != "DIFFCLI_API_KEY"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", timeout)
        self.port = int(re.search(r":(\d+)", line.split("http://", 1)[1]).group(1))
        self.url = f"http://{HOST}:{self.port}"
        if ready:
            self.wait_for(r"diffcli serve: ready", timeout)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """The first stderr line (seen so far or coming) that matches `pattern`."""
        rx = re.compile(pattern)
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[seen:]:
                if rx.search(line):
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r}; stderr:\n" + self.log())
            try:
                if self._new.get(timeout=min(left, 0.5)) is None and self.proc.poll() is not None:
                    if not any(rx.search(x) for x in self.lines):
                        raise AssertionError(f"server exited ({self.proc.returncode}) before "
                                             f"{pattern!r}; stderr:\n" + self.log())
            except queue.Empty:
                pass

    def log(self) -> str:
        return "\n".join(self.lines)

    def client(self, api_key: str = "none", **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def async_client(self, api_key: str = "none", **kw):
        import openai
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                                  timeout=kw.pop("timeout", 120), **kw)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def raw(port: int, method: str, path: str, body: bytes | str | dict | None = None,
         headers: dict | None = None, timeout: float = 60.0):
    """One raw request -> (status, headers, parsed JSON or text)."""
    conn = httpclient.HTTPConnection(HOST, port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
    h = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        raw = r.read().decode("utf-8", "replace")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = raw
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def metric(port: int, name: str, headers: dict | None = None) -> float:
    status, _, text = raw(port, "GET", "/metrics", headers=headers)
    assert status == 200, text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


def outcome_count(port: int, outcome: str, headers: dict | None = None) -> int:
    _, _, text = raw(port, "GET", "/metrics", headers=headers)
    m = re.search(rf'diffcli_requests_total{{outcome="{outcome}"}} (\d+)', text)
    assert m, text
    return int(m.group(1))


class Reference:
    """What the server must answer, computed in this process with the library and the CLI's
    own conversation code (not the server's)."""

    def __init__(self, model_path: Path, max_steps: int = 2):
        self.tok = Tokenizer.from_gguf(model_path)
        self.model = diffcli.load(model_path, dtype="f32")
        self.sampler = diffcli.SamplerConfig(max_steps=max_steps)
        self.C = int(self.model.config.canvas_length)

    def chat_ids(self, messages, thinking: bool = False) -> list[int]:
        conv = Conversation(ChatTemplate(self.tok.chat_template), self.tok, enable_thinking=thinking)
        conv.messages = [dict(m) for m in messages]
        return conv.prompt_ids()

    def tokens(self, ids, max_tokens: int, seed: int, images=(), **sampler) -> list[int]:
        """The first max_tokens tokens the library generates, on one thread as the server does
        (the same reduction order, so the same floats and the same tokens). `images`: the
        prompt's image spans (`image_spans`)."""
        import dataclasses

        import torch
        s = dataclasses.replace(self.sampler, **sampler)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            done = diffcli.generate(self.model, ids, max_new_tokens=max_tokens, seed=seed,
                                    sampler=s, eog_ids=self.tok.eog_ids, images=tuple(images))
        finally:
            torch.set_num_threads(threads)
        return done.tokens[:max_tokens]

    def image_spans(self, tower, slots) -> list:
        """(first soft token index, prepared image) -> ImageSpan: the vision tower run here, on
        one thread as in the server."""
        import torch
        from diffcli.model.images import ImageSpan
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [ImageSpan(start, tower.embed(torch.from_numpy(img.pixels), img.grid), img.digest)
                    for start, img in slots]
        finally:
            torch.set_num_threads(threads)

    def answer(self, tokens) -> str:
        return split_thinking(self.tok.decode(tokens))[1]


def data_url(path: Path, mime: str | None = None) -> str:
    """An image file as the data: URL an OpenAI client sends in an image_url part."""
    import base64
    mime = mime or {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                    ".webp": "image/webp"}[Path(path).suffix.lower()]
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@contextlib.contextmanager
def in_process(mf, settings, load):
    """`serve()` in a thread of this process (a loader the test controls); yields (port, logs)."""
    from diffcli.serve.server import serve

    logs: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(mf, settings), daemon=True,
                              kwargs=dict(host=HOST, port=0, load=load, log=logs.append, stop=stop))
    thread.start()
    deadline = time.monotonic() + 30
    while not any("listening on" in m for m in logs):
        assert time.monotonic() < deadline and thread.is_alive(), logs
        time.sleep(0.01)
    port = int(re.search(r":(\d+) ", next(m for m in logs if "listening on" in m)).group(1))
    try:
        yield port, logs
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


def wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while raw(port, "GET", "/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


class ScriptedModel:
    """A model double whose every canvas denoises straight to the next C tokens of a script (then
    end-of-generation): logits with one peak per position, so the sampler accepts everything and
    stops on the second step. Lets a test know exactly what the server must send."""

    def __init__(self, config, script: list[int], eog: int):
        import torch
        self.config, self.device, self.dtype = config, "cpu", torch.float32
        self.C, self.V = int(config.canvas_length), int(config.vocab_size)
        self.script, self.eog = list(script), eog

    def encode(self, prompt):
        return {"canvas": 0}

    def denoise(self, cache, canvas, sc=None):
        import torch
        i = cache["canvas"] * self.C
        want = (self.script[i:i + self.C] + [self.eog] * self.C)[:self.C]
        logits = torch.full((self.C, self.V), -30.0)
        logits[torch.arange(self.C), torch.tensor(want)] = 30.0
        return logits

    def commit(self, cache, block):
        cache["canvas"] += 1
        return cache
