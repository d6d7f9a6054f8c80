"""Committed canvases -> the text of a reply, the way an OpenAI-compatible server returns it.

A canvas commits up to C tokens at once; `Reply.feed` turns each committed canvas into the text it
adds, split into the thought channel (`reasoning`) and the answer (`content`), and applies what a
request asks for on top of the generation loop:

- `max_tokens` exactly: the loop runs ceil(max_tokens / C) canvases and the last one is trimmed
  here, so a reply never has more tokens than asked for (vLLM rounds up to a whole canvas);
- `stop` strings, matched in the answer; text that could be the start of a stop string is held
  back until the next canvas shows whether it is one, so a stop string that straddles two
  canvases is never sent;
- an honest finish reason ("stop": the model ended, cut a repetition loop, or a stop string
  matched; "length": the token budget or the canvases ran out) and the emitted token count
  (tokens after a cut are not counted, nor the unused rest of a canvas).

Thought text is only sent once its channel header (`<|channel>thought\\n`) is complete, so what
was sent is always a prefix of the final text.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..text.chat import CHANNEL_CLOSE, CHANNEL_OPEN, split_thinking

STOP, LENGTH = "stop", "length"


@dataclass
class Delta:
    """What one committed canvas adds to the reply."""
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class Reply:
    """One reply being generated. `reasoning=False` keeps the thought channel in `content`
    (a raw completion); `max_tokens=None` means no budget beyond the canvases the loop runs."""

    def __init__(self, tokenizer, *, max_tokens: int | None = None, stop: tuple[str, ...] = (),
                 reasoning: bool = True):
        self._decoder = tokenizer.stream_decoder()
        self.max_tokens = max_tokens
        self.stop = tuple(s for s in stop if s)
        self.reasoning_on = reasoning
        self.tokens: list[int] = []        # emitted ids
        self._ends: list[int] = []         # len(raw) after each emitted token
        self.raw = ""                      # decoded text of the emitted ids (user-defined tokens shown)
        self.reasoning = ""                # what has been sent
        self.content = ""
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_match: str | None = None  # the stop string that ended the reply
        self.cause: str | None = None       # eog | repetition | stop | max_tokens | canvases

    # ---- feeding -----------------------------------------------------------------------------
    def feed(self, tokens: list[int], ended: bool = False, reason: str | None = None) -> Delta:
        """Add a committed canvas's kept tokens; `ended`/`reason` as in the loop's CanvasEvent."""
        if self.finished:
            return Delta()
        trimmed = False
        if self.max_tokens is not None:
            room = self.max_tokens - len(self.tokens)
            if len(tokens) > room:
                tokens, trimmed = tokens[:room], True
        for t in tokens:
            self.raw += self._decoder.feed([t])
            self.tokens.append(int(t))
            self._ends.append(len(self.raw))
        full = self.max_tokens is not None and len(self.tokens) >= self.max_tokens
        if trimmed or full:
            self._finish(LENGTH, "max_tokens")
        elif ended:
            self._finish(STOP if reason in ("eog", "repetition", "eos") else LENGTH,
                         reason if reason in ("eog", "repetition", "eos") else "canvases")
        if self.finished:
            self.raw += self._decoder.flush()
            if self._ends:
                self._ends[-1] = len(self.raw)
        return self._advance()

    def _finish(self, reason: str, cause: str) -> None:
        self.finished, self.finish_reason, self.cause = True, reason, cause

    # ---- text --------------------------------------------------------------------------------
    def _split(self, raw: str) -> tuple[str, str]:
        if not self.reasoning_on:
            return "", raw
        return split_thinking(raw)

    def _advance(self) -> Delta:
        raw = self.raw
        if self.reasoning_on and not self.finished:
            raw = _before_open_header(raw)
        thinking, answer = self._split(raw)
        if self.stop:
            hit = self._find_stop(answer)
            if hit is not None:
                at, s = hit
                self._cut_at_stop(at + len(s))
                thinking, answer = self._split(self.raw)
                answer = answer[:at]
                self.stop_match = s
                self._finish(STOP, "stop")
            elif not self.finished:
                answer = answer[:len(answer) - _held_back(answer, self.stop)]
        delta = Delta(_tail(thinking, self.reasoning), _tail(answer, self.content))
        self.reasoning += delta.reasoning
        self.content += delta.content
        return delta

    def _find_stop(self, answer: str) -> tuple[int, str] | None:
        longest = max(len(s) for s in self.stop)
        start = max(0, len(self.content) - longest + 1)
        best = None
        for s in self.stop:
            i = answer.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _cut_at_stop(self, answer_end: int) -> None:
        """Keep the fewest tokens whose text reaches the end of the stop string."""
        for n, end in enumerate(self._ends, start=1):
            if len(self._split(self.raw[:end])[1]) >= answer_end:
                del self.tokens[n:], self._ends[n:]
                self.raw = self.raw[:end]
                return

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def in_thought(self) -> bool:
        """The reply so far ends inside an open thought channel."""
        return self.reasoning_on and self.raw.rfind(CHANNEL_OPEN) > self.raw.rfind(CHANNEL_CLOSE)


def _tail(text: str, sent: str) -> str:
    # What was sent is a prefix of the text by construction (held-back stop prefixes, complete
    # channel headers only); anything else would be a bug, so fail loudly rather than resend.
    assert text.startswith(sent), (text, sent)
    return text[len(sent):]


def _before_open_header(raw: str) -> str:
    """Cut an open thought channel whose header line is not complete yet: until its newline
    arrives, "<|channel>thou" cannot be told from a channel without a name."""
    i = raw.rfind(CHANNEL_OPEN)
    if i < 0 or raw.rfind(CHANNEL_CLOSE) > i:
        return raw
    return raw if "\n" in raw[i + len(CHANNEL_OPEN):] else raw[:i]


def _held_back(answer: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `answer` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(answer)), best, -1):
            if answer.endswith(s[:k]):
                best = k
                break
    return best
