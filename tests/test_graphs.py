"""CUDA graphs for the canvas step (diffcli/compute/graphs.py; issue 6, item 3).

On the CPU, `StepGraph` is driven with `GraphLike`, a stand-in with a graph's semantics: what is
captured reads the static inputs and the cache snapshot it was recorded with, and every replay
overwrites the one output tensor. Checks:
- generation gives identical tokens with the runner on and off, over several canvases, and the
  runner did capture and replay (a negative control shows a runner that ignores the cache
  change gives other tokens, so the comparison can fail);
- a failed capture falls back to eager steps with one warning;
- the captured region (`_decode_body`) dispatches no op that waits for the host on CUDA
  (.item(), bincount, nonzero, ...), on the Triton backend under TRITON_INTERPRET=1;
- on a GPU (marked gpu): real CUDA graphs give the same tokens as eager steps.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import diffcli  # noqa: E402
from diffcli.compute import graphs  # noqa: E402
from diffcli.compute.backend import set_backend  # noqa: E402
from diffcli.generation.loop import StepEvent, stream  # noqa: E402
from diffcli.generation.sampler import SamplerConfig  # noqa: E402

pytest.importorskip("transformers")     # make_tiny_gguf builds the tiny model with it

PROMPT = [2] + list(range(10, 21))
# confidence 0: a canvas never stops early, so every canvas runs all its steps
SAMPLER = SamplerConfig(max_steps=5, confidence=0.0)


class GraphLike:
    """A CPU stand-in for CudaCapture with a CUDA graph's semantics."""

    def __init__(self):
        self.runs = 0

    def run(self, fn):
        self.runs += 1
        return fn()

    def capture(self, fn):
        out = fn()                       # shapes and the output tensor, as capture allocates it

        def replay():
            out.copy_(fn())              # same tensor, overwritten: the caller must not hold it
        return replay, out


class FailingCapture(GraphLike):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from diffcli.testing import make_tiny_gguf
    path, _ = make_tiny_gguf(tmp_path_factory.mktemp("graphs") / "tiny.gguf", outtype="f32",
                             seed=0)
    return diffcli.load(path, device="cpu", dtype=torch.float32)


def _run(model, runner, seed=3, canvases=3, kv_cache=True):
    model._step_graph = runner
    try:
        return list(stream(model, PROMPT, max_new_tokens=canvases * model.config.canvas_length,
                           sampler=SAMPLER, seed=seed, mode="hf", eog_ids=(), kv_cache=kv_cache))
    finally:
        model._step_graph = None


def _steps(events):
    return [e for e in events if isinstance(e, StepEvent)]


def test_graphs_off_on_cpu_models(model):
    assert model.step_graph is None            # CPU weights: steps always run eagerly
    model.cuda_graphs = False
    try:
        model._step_graph = graphs.StepGraph(model._decode_body, GraphLike())
        assert model.step_graph is None        # switched off wins over an existing runner
    finally:
        model.cuda_graphs, model._step_graph = True, None


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False), ("off", False),
                                      ("False", False), ("no", False), ("yes", True)])
def test_env_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(graphs.ENV, raising=False)
    else:
        monkeypatch.setenv(graphs.ENV, value)
    assert graphs.enabled_by_env() is on


def test_env_switch_rejects_other_values(monkeypatch):
    from diffcli.errors import InputError
    monkeypatch.setenv(graphs.ENV, "of")
    with pytest.raises(InputError, match="DIFFCLI_CUDA_GRAPHS='of'"):
        graphs.enabled_by_env()


def test_generate_same_tokens_with_graph_replays(model):
    eager = _run(model, None)
    runner = graphs.StepGraph(model._decode_body, GraphLike())
    graphed = _run(model, runner)
    assert graphed[-1].tokens == eager[-1].tokens
    assert len(eager[-1].tokens) == 3 * model.config.canvas_length
    for a, b in zip(_steps(graphed), _steps(eager), strict=True):
        assert torch.equal(a.argmax, b.argmax) and torch.equal(a.accepted, b.accepted)
        assert torch.equal(a.entropy, b.entropy)
    # 5 steps x 3 canvases: step 1 of each canvas has no self-conditioning (not the runner's);
    # step 2 is the first on the canvas's cache (eager), step 3 captures, every step replays
    assert (runner.eager, runner.captures, runner.replays) == (3, 3, 3 * 3)
    assert runner.error is None


def test_a_cache_read_once_is_never_captured(model):
    """--diffusion-kv-cache off re-encodes the prefix every step: a new cache each time, so
    every step runs eagerly and nothing is captured (a capture would be pure cost)."""
    eager = _run(model, None, kv_cache=False, canvases=2)
    runner = graphs.StepGraph(model._decode_body, GraphLike())
    got = _run(model, runner, kv_cache=False, canvases=2)
    assert got[-1].tokens == eager[-1].tokens
    assert (runner.eager, runner.captures, runner.replays) == (2 * 4, 0, 0)


class _NoDrop(graphs.StepGraph):
    """Ignores model.commit's drop(): only the cache check in __call__ can catch a commit."""
    def drop(self):
        pass


class _Stale(_NoDrop):
    """Keeps replaying its graph whatever cache it is given (a broken runner)."""
    def __call__(self, cache, ids, soft):
        if self.live is not None:
            self.live.ids.copy_(ids)
            self.live.soft.copy_(soft)
            self.live.replay()
            return self.live.out
        return super().__call__(cache, ids, soft)


def test_cache_check_alone_catches_a_commit(model):
    eager = _run(model, None)
    runner = _NoDrop(model._decode_body, GraphLike())
    assert _run(model, runner)[-1].tokens == eager[-1].tokens
    assert runner.captures == 3


def test_negative_control_stale_graph_changes_tokens(model):
    """A runner that keeps its graph across a commit replays the old cache: the tokens of the
    later canvases differ, so the token equality above is a real check of the invalidation."""
    eager = _run(model, None)
    stale = _run(model, _Stale(model._decode_body, GraphLike()))
    C = model.config.canvas_length
    assert stale[-1].tokens[:C] == eager[-1].tokens[:C]      # canvas 0: the graph is current
    assert stale[-1].tokens[C:] != eager[-1].tokens[C:]


def test_commit_drops_the_graph(model):
    runner = graphs.StepGraph(model._decode_body, GraphLike())
    model._step_graph = runner
    try:
        cache = model.encode(torch.tensor(PROMPT))
        ids = torch.arange(model.config.canvas_length)
        soft = torch.randn(model.config.canvas_length, model.config.n_embd)
        want = model._decode_body(cache, ids, soft).clone()
        runner(cache, ids, soft)                           # warm-up
        first = runner(cache, ids, soft)                   # capture + replay
        assert runner.live is not None and torch.equal(first, want)
        again = runner(cache, ids + 1, soft)               # replay: the same output tensor
        assert again is first and not torch.equal(again, want)
        model.commit(cache, ids)
        assert runner.live is None
    finally:
        model._step_graph = None


def test_failed_capture_falls_back_once(model):
    said = []
    runner = graphs.StepGraph(model._decode_body, FailingCapture(), warn=said.append)
    eager = _run(model, None)
    got = _run(model, runner)
    assert got[-1].tokens == eager[-1].tokens
    assert len(said) == 1 and "CUDA graph capture failed" in said[0]
    assert "RuntimeError: operation not permitted" in said[0] and "more detail" not in said[0]
    assert runner.captures == runner.replays == 0 and runner.error is not None


def test_unfused_sc_logits_path_uses_the_runner(model):
    """denoise(sc_logits=...) (the unfused head) turns the logits into the soft embedding
    outside the graph and replays the same body."""
    cache = model.encode(torch.tensor(PROMPT))
    canvas = torch.arange(model.config.canvas_length) * 7 % model.config.vocab_size
    sc = model.denoise(cache, canvas) / 0.7
    want = model.denoise(cache, canvas, sc)
    runner = graphs.StepGraph(model._decode_body, GraphLike())
    model._step_graph = runner
    try:
        got = [model.denoise(cache, canvas, sc) for _ in range(3)]
    finally:
        model._step_graph = None
    assert (runner.eager, runner.captures, runner.replays) == (1, 1, 2)
    for g in got:
        assert torch.equal(g, want)


# --- nothing in the captured region waits for the host ------------------------------------

# ops that synchronise with the host on CUDA (a scalar read, or an output size read from data)
HOST_SYNC = {"aten.item", "aten._local_scalar_dense", "aten.bincount", "aten.nonzero",
             "aten.unique", "aten._unique", "aten._unique2", "aten.unique_consecutive",
             "aten.unique_dim", "aten.masked_select", "aten.is_nonzero", "aten.equal",
             "aten.allclose", "aten.repeat_interleave", "aten.tolist"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    from diffcli.testing import make_tiny_gguf
    path, _ = make_tiny_gguf(tmp_path_factory.mktemp("graphs_q") / "tiny-q8.gguf",
                             outtype="q8_0", seed=1)
    return diffcli.load(path, device="cpu", dtype=torch.float32)


def test_captured_region_never_waits_for_the_host(qmodel):
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 on a machine without CUDA")
    set_backend("triton")       # the backend graphs run with: fused qmatmul and grouped MoE
    try:
        cache = qmodel.encode(torch.tensor(PROMPT))
        ids = torch.arange(qmodel.config.canvas_length)
        soft = torch.randn(qmodel.config.canvas_length, qmodel.config.n_embd)
        with torch.inference_mode(), _Ops() as ops:
            qmodel._decode_body(cache, ids, soft)
    finally:
        set_backend(None)
    assert "aten.topk" in ops.seen and "aten.argsort" in ops.seen     # the MoE routing ran
    assert not ops.seen & HOST_SYNC, sorted(ops.seen & HOST_SYNC)


def test_the_sync_check_catches_a_host_read(qmodel):
    """The op check above sees a host read where one happens (here the CPU-only id check of
    `_ids`, which runs outside the captured region)."""
    with torch.inference_mode(), _Ops() as ops:
        qmodel._ids(torch.arange(4))
    assert ops.seen & HOST_SYNC


# --- real CUDA graphs ----------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graph_tokens_match_eager(tmp_path):
    from diffcli.testing import make_tiny_gguf
    path, _ = make_tiny_gguf(tmp_path / "tiny-q8.gguf", outtype="q8_0", seed=2)
    m = diffcli.load(path, device="cuda")
    assert m.step_graph is not None
    runs = {}
    for on in (False, True):
        m.cuda_graphs = on
        m._step_graph = None
        runs[on] = list(stream(m, PROMPT, max_new_tokens=3 * m.config.canvas_length,
                               sampler=SAMPLER, seed=5, mode="hf", eog_ids=()))
    runner = m._step_graph
    assert runner is not None and runner.error is None and runner.replays >= 3
    assert runs[True][-1].tokens == runs[False][-1].tokens
    for a, b in zip(_steps(runs[True]), _steps(runs[False]), strict=True):
        assert torch.equal(a.argmax, b.argmax) and torch.equal(a.accepted, b.accepted)


def test_fused_head_steps_use_the_runner(model):
    """The fused vocabulary head (Triton, interpreted here) feeds its soft embedding to the
    graphed body: same tokens as the fused head without graphs."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 on a machine without CUDA")
    set_backend("triton")
    try:
        assert model.use_fused_head
        eager = _run(model, None, canvases=2)
        runner = graphs.StepGraph(model._decode_body, GraphLike())
        got = _run(model, runner, canvases=2)
    finally:
        set_backend(None)
    assert got[-1].tokens == eager[-1].tokens
    assert (runner.eager, runner.captures, runner.replays) == (2, 2, 2 * 3)
