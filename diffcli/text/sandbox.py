"""The sandbox a chat template renders in, and what one render may spend.

A chat template is code from the model file. It runs in jinja2's ImmutableSandboxedEnvironment
(what transformers 5.23.0 renders with, spec §D.3: trim_blocks, lstrip_blocks, `loopcontrols`,
`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape), made to count: the
sandbox keeps the template from reaching anything, TemplateLimits from running for ever or
filling the memory. text/chat.py's ChatTemplate compiles and renders through it.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime
from typing import Any

from ..errors import InputError


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


class RenderState:
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
        def state(self) -> RenderState | None:
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


def environment():
    """A fresh guarded environment with transformers' globals and filters (the class is made once)."""
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


def one_line(exc: BaseException) -> str:
    """An exception as one short line for an InputError (a limit's own message as it is)."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, TemplateLimitError) else text
