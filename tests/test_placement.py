"""Placement (-ngl, --n-cpu-moe, -ot, --no-mmap) and the GPU memory preflight (spec §C.8).

The plans are checked against the flags' documented meaning (llama.cpp's: -ngl N offloads the
last N layers, --n-cpu-moe N keeps the experts of layers 0..N-1 on the CPU, -ot's first match
wins) on a tiny file's tensor names. The preflight runs on the real 26B-A4B tensor inventory
(scripts/synth_gguf.py's plan, no file written) with a fake free-memory figure. Split runs are
compared with the plain run: on CPU both sides are the CPU, so the logits must be identical; the
real GPU split runs under the gpu marker.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
from types import SimpleNamespace

import pytest
import torch

import diffcli
from diffcli.errors import InputError
from diffcli.model import placement
from diffcli.errors import InputError
from diffcli.gguf.reader import TensorInfo, open_gguf
from diffcli.model.placement import device_bytes, parse_device, plan_placement

from _cli_fixtures import make_model, run

_spec = importlib.util.spec_from_file_location(
    "synth_gguf", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "synth_gguf.py")
synth = importlib.util.module_from_spec(_spec)
sys.modules["synth_gguf"] = synth
_spec.loader.exec_module(synth)

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
EXPERTS = ("ffn_gate_up_exps.weight", "ffn_down_exps.weight")
PROMPT = torch.tensor([2] + list(range(10, 21)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 layers (0, 2 sliding; 1, 3 global), f32."""
    return make_model(tmp_path_factory.mktemp("placement") / "tiny.gguf")


@pytest.fixture(scope="module")
def names(tiny):
    return open_gguf(tiny).tensor_names


def _layer(name):
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ---- the plan ------------------------------------------------------------------------------

def test_all_layers_by_default(names):
    plan = plan_placement(names, 4, "cuda:0")
    assert plan.layers == [GPU] * 4 and plan.head == GPU
    assert set(plan.tensors) == set(names) and set(plan.tensors.values()) == {GPU}
    assert plan_placement(names, 4, "cuda:0", n_gpu_layers=99).tensors == plan.tensors


def test_ngl_zero_is_all_cpu(names):
    plan = plan_placement(names, 4, "cuda:0", n_gpu_layers=0)
    assert plan.layers == [CPU] * 4 and plan.head == CPU
    assert set(plan.tensors.values()) == {CPU}


@pytest.mark.parametrize("ngl", [1, 2, 3])
def test_ngl_offloads_the_last_layers(names, ngl):
    plan = plan_placement(names, 4, "cuda:0", n_gpu_layers=ngl)
    assert plan.layers == [CPU] * (4 - ngl) + [GPU] * ngl
    assert plan.head == GPU      # the tied embedding / head follows the GPU once a layer does
    for name, dev in plan.tensors.items():
        i = _layer(name)
        assert dev == (GPU if i is None or i >= 4 - ngl else CPU), name


def test_n_cpu_moe_keeps_first_experts_on_cpu(names):
    plan = plan_placement(names, 4, "cuda:0", n_cpu_moe=3)
    assert plan.layers == [GPU] * 4
    for name, dev in plan.tensors.items():
        i = _layer(name)
        on_cpu = i is not None and i < 3 and name.endswith(EXPERTS)
        assert dev == (CPU if on_cpu else GPU), name
    assert plan.tensors["blk.0.ffn_down_exps.scale"] == GPU    # small tensors follow the layer


def test_override_first_match_wins(names):
    plan = plan_placement(names, 4, "cuda:0",
                          override_tensor=[r"blk\.1\.attn_q\.=CPU", r"attn_q=CUDA0,token_embd=CPU"])
    off = {n for n, d in plan.tensors.items() if d == CPU}
    assert off == {"blk.1.attn_q.weight", "token_embd.weight"}
    plan = plan_placement(names, 4, "cuda", n_gpu_layers=0, override_tensor=["attn_k=cuda:0"])
    assert {n for n, d in plan.tensors.items() if d == GPU} == {
        f"blk.{i}.attn_k.weight" for i in range(4)}
    # -ot is searched before --n-cpu-moe
    plan = plan_placement(names, 4, "cuda:0", n_cpu_moe=4, override_tensor=[r"blk\.3\.ffn=CUDA0"])
    assert plan.tensors["blk.3.ffn_down_exps.weight"] == GPU
    assert plan.tensors["blk.2.ffn_down_exps.weight"] == CPU


def test_override_moves_the_expert_pair_together(names):
    plan = plan_placement(names, 4, "cuda:0", override_tensor=[r"blk\.2\.ffn_down_exps=CPU"])
    assert plan.tensors["blk.2.ffn_gate_up_exps.weight"] == CPU
    assert plan.tensors["blk.1.ffn_gate_up_exps.weight"] == GPU
    # norms are not placeable by -ot: they follow their layer
    plan = plan_placement(names, 4, "cuda:0", override_tensor=["norm=CPU"])
    assert set(plan.tensors.values()) == {GPU}


def test_device_names():
    assert parse_device("CPU") == CPU and parse_device("CUDA0") == GPU
    assert parse_device("cuda:1") == torch.device("cuda", 1) and parse_device("cuda") == GPU
    assert parse_device("mps").type == "mps"


@pytest.mark.parametrize("bad", ["attn_q", "=CPU", "attn=TPU0", "([=CPU"])
def test_bad_override_is_one_line(names, bad):
    with pytest.raises(InputError) as e:
        plan_placement(names, 4, "cuda:0", override_tensor=[bad])
    assert "-ot" in e.value.message and "\n" not in e.value.message


# ---- the preflight on the real 26B-A4B inventory --------------------------------------------

D = synth.Dims()


def _infos(qtype="Q4_K_M"):
    return [TensorInfo(n, tuple(reversed(s)), t, 0, synth.nbytes(s, t))
            for n, s, t in synth.tensor_plan(D, qtype)]


def _need(infos, ngl=-1, ncm=0):
    plan = plan_placement([i.name for i in infos], D.n_layer, GPU, ngl, ncm)
    return device_bytes(infos, plan, GPU, window=D.W)


def test_full_model_bytes_from_the_inventory():
    """All on the GPU: every tensor's bytes (the small ones are F32 in the file, so their float32
    copies are their file bytes) plus the workspace the docstring lists, from spec dims."""
    infos = _infos()
    C, P, V, H = 256, 2048, D.V, D.H
    weights = sum(i.nbytes for i in infos)
    head = V * H * 2 + C * V * (4 * 4 + 2)
    kv = scores = 0
    for i in range(D.n_layer):
        hd, nkv = (D.hd_swa, D.nkv_swa) if D.sliding(i) else (D.hd, D.nkv)
        kept = min(P, D.W - 1) if D.sliding(i) else P
        kv += 2 * nkv * hd * (kept + C) * 2
        scores = max(scores, 4 * D.Nq * C * (kept + C))     # one layer at a time
    assert _need(infos) == weights + head + kv + scores + placement.RESERVE_BYTES
    assert 19e9 < _need(infos) < 21e9       # 16.8 GB of weights + 1.5 GB dense embedding + ...


def test_fewer_layers_and_cpu_experts_need_less():
    infos = _infos()
    by_ngl = [_need(infos, ngl) for ngl in range(D.n_layer, 0, -1)]
    by_ncm = [_need(infos, -1, n) for n in range(D.n_layer + 1)]
    assert all(a > b for a, b in zip(by_ngl, by_ngl[1:]))
    assert all(a > b for a, b in zip(by_ncm, by_ncm[1:]))
    assert _need(infos, 0) == 0     # nothing on the GPU
    # --n-cpu-moe saves exactly the expert tensors' bytes (workspace stays on the GPU)
    experts = sum(i.nbytes for i in infos if i.name.endswith(EXPERTS))
    assert by_ncm[0] - by_ncm[-1] == experts and experts > 14e9


def test_preflight_message_suggests_a_fitting_placement(monkeypatch):
    infos = _infos()
    f = SimpleNamespace(path="m.gguf", tensor_names=[i.name for i in infos],
                        info={i.name: i for i in infos}.__getitem__)
    cfg = SimpleNamespace(n_layer=D.n_layer, canvas_length=256, sliding_window=D.W)
    plan = plan_placement(f.tensor_names, D.n_layer, GPU)
    monkeypatch.setattr(placement, "free_bytes", lambda dev: int(11.2e9))
    with pytest.raises(InputError) as e:
        placement.check_fits(f, cfg, plan, {GPU: torch.bfloat16}, n_gpu_layers=-1, n_cpu_moe=0)
    msg = e.value.message
    m = re.fullmatch(r"m\.gguf: needs (\d+\.\d) GB on cuda:0 but 11\.2 GB is free; "
                     r"try -ngl (\d+) or --n-cpu-moe (\d+)", msg)
    assert m, msg
    assert float(m.group(1)) == round(_need(infos) / 1e9, 1)
    ngl, ncm = int(m.group(2)), int(m.group(3))
    free = 11.2e9
    assert _need(infos, ngl) <= free < _need(infos, ngl + 1)       # the most layers that fit
    assert _need(infos, -1, ncm) <= free < _need(infos, -1, ncm - 1)   # the fewest CPU experts
    monkeypatch.setattr(placement, "free_bytes", lambda dev: int(30e9))
    placement.check_fits(f, cfg, plan, {GPU: torch.bfloat16}, n_gpu_layers=-1, n_cpu_moe=0)


def test_preflight_when_only_cpu_fits(monkeypatch):
    infos = _infos()
    f = SimpleNamespace(path="m.gguf", tensor_names=[i.name for i in infos],
                        info={i.name: i for i in infos}.__getitem__)
    cfg = SimpleNamespace(n_layer=D.n_layer, canvas_length=256, sliding_window=D.W)
    monkeypatch.setattr(placement, "free_bytes", lambda dev: int(0.3e9))
    with pytest.raises(InputError, match=r"try -ngl 0 \(CPU only\)$"):
        placement.check_fits(f, cfg, plan_placement(f.tensor_names, D.n_layer, GPU),
                             {GPU: torch.bfloat16}, n_gpu_layers=-1, n_cpu_moe=0)


# ---- split runs -----------------------------------------------------------------------------

def _run(model):
    g = torch.Generator().manual_seed(1)
    canvas = lambda: torch.randint(5, 500, (16,), generator=g)
    cache = model.encode(PROMPT)
    first = model.denoise(cache, canvas())
    model.commit(cache, canvas())
    second = model.denoise(cache, canvas(), first / 0.7)
    return first.cpu(), second.cpu(), cache.length


@pytest.mark.parametrize("kw", [dict(n_gpu_layers=2), dict(n_cpu_moe=3),
                                dict(override_tensor=["attn_q=CPU", "token_embd=CPU"]),
                                dict(n_gpu_layers=1, n_cpu_moe=4, mmap=False)])
def test_split_on_cpu_matches_plain(tiny, kw):
    want = _run(diffcli.load(tiny))
    got = _run(diffcli.load(tiny, **kw))
    for a, b in zip(want[:2], got[:2]):
        assert torch.equal(a, b)
    assert want[2] == got[2]


def test_no_mmap_copies_out_of_the_mapping(tiny):
    def inside(model, qt):
        start = model.gguf._map.ctypes.data
        return start <= qt.raw.data_ptr() < start + model.gguf._map.size
    mapped, copied = diffcli.load(tiny), diffcli.load(tiny, mmap=False)
    assert inside(mapped, mapped.w.layers[0].wq) and inside(mapped, mapped.w.embed)
    assert not inside(copied, copied.w.layers[0].wq) and not inside(copied, copied.w.embed)
    assert not inside(copied, copied.w.layers[0].exp_down)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(n_gpu_layers=2), dict(n_cpu_moe=2),
                                dict(n_gpu_layers=3, override_tensor=["ffn_gate_up_exps=CPU"])])
def test_cuda_split_matches_cuda(tmp_path, kw):
    """float32 everywhere, so both sides compute the same maths; only kernels differ."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from diffcli.testing import make_random_gguf
    path = make_random_gguf(tmp_path / "r.gguf", {"top_k_experts": 8}, seed=3)
    want = _run(diffcli.load(path, device="cuda", dtype=torch.float32))
    model = diffcli.load(path, device="cuda", dtype=torch.float32, **kw)
    assert CPU in set(model.placement.tensors.values())
    got = _run(model)
    for a, b in zip(want[:2], got[:2]):
        assert ((a - b).norm() / a.norm()).item() <= 1e-3


# ---- the CLI --------------------------------------------------------------------------------

def test_cli_too_big_placement_exits_2(tiny, monkeypatch):
    """A faked CUDA device with too little free memory: exit 2, one line naming a fitting -ngl;
    nothing is copied (there is no real device to copy to)."""
    f = open_gguf(tiny)
    infos = [f.info(n) for n in f.tensor_names]

    def need(ngl):
        plan = plan_placement(f.tensor_names, 4, GPU, ngl)
        return device_bytes(infos, plan, GPU, act_bytes=2, canvas=16, window=8)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(placement, "free_bytes", lambda dev: need(2))
    result = run(["-m", tiny, "-p", "hi", "--device", "CUDA0", "--no-perf"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(r"needs \d+\.\d GB on cuda:0 but \d+\.\d GB is free; "
                     r"try -ngl 2( or --n-cpu-moe \d)?$", lines[0])


def test_cli_passes_placement_flags(tiny, monkeypatch):
    """The flags reach diffcli.load (none is logged as ignored) and the run still answers."""
    seen, loaded = {}, []
    real = diffcli.load

    def spy(path, **kw):
        seen.update(kw)
        loaded.append(real(path, **kw))
        return loaded[-1]

    monkeypatch.setattr(diffcli, "load", spy)
    result = run(["-m", tiny, "-p", "hi", "--device", "cpu", "--no-perf", "-n", "16",
                  "--diffusion-eb-max-steps", "2", "-ngl", "2", "--n-cpu-moe", "1",
                  "-ot", "attn_q=CPU", "--no-mmap", "--dtype", "f32"])
    assert result.exit_code == 0, result.stderr
    assert seen == dict(device="cpu", dtype="f32", n_gpu_layers=2, n_cpu_moe=1,
                        override_tensor=("attn_q=CPU",), mmap=False)
    assert loaded[0].dtype == torch.float32          # load() maps the flag's name to the dtype
    assert "ignored" not in result.stderr


def test_load_takes_the_dtype_by_name(tiny):
    assert diffcli.load(tiny, device="cpu", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(InputError, match="unknown activation dtype 'f64'"):
        diffcli.load(tiny, device="cpu", dtype="f64")
