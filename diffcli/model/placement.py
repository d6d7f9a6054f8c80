"""Where each weight lives: -ngl, --n-cpu-moe and -ot (spec §C.8), and the GPU memory preflight.

Semantics, as llama.cpp where it applies:
- `-ngl N` offloads the *last* N layers (llama.cpp's `i_gpu_start = n_layer - N`): the first
  n_layer - N run on the CPU, so the hidden state crosses devices once per pass. -1 (or any
  N >= n_layer) = every layer; 0 = everything on the CPU.
- The head (the tied `token_embd`, which is also the self-conditioning soft embedding, plus the
  self-conditioning MLP and the final norm) goes to the accelerator whenever at least one layer
  does. llama.cpp keeps its output layer on the CPU unless N > n_layer; here the head's two
  [C, V] x [V, H] products are the largest matmuls of a denoising step, so it follows the GPU.
- `--n-cpu-moe N` keeps the expert tensors (`ffn_gate_up_exps`, `ffn_down_exps`) of layers
  0..N-1 on the CPU; that layer's routed experts then run there (CPU backend) and only the
  [T, H] expert input and output cross the bus.
- `-ot REGEX=DEV` (repeatable; first matching pattern wins, before --n-cpu-moe and -ngl, as
  llama.cpp appends its --n-cpu-moe patterns after the user's) places the quantized matrices
  whose GGUF name the regex searches. A matmul runs where its weight is. The two expert tensors
  of a layer always share a device (the CPU if either is put there). The 1-D norms, scales
  and the router follow their layer: they are tiny and read by every op of it.

A layer's *device* (where its activations, norms and KV cache live) is set by -ngl alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import InputError
from .weights import GLOBAL_NAMES, LAYER_NAMES, QUANTIZED

EXPERT_ATTRS = ("exp_gate_up", "exp_down")
_LAYER = re.compile(r"^blk\.(\d+)\.")
# GGUF name suffix (after "blk.{i}.") -> attribute, for the per-layer templates
_SUFFIX_ATTR = {tmpl.split("}.", 1)[1]: attr for attr, tmpl in LAYER_NAMES.items()}
_GLOBAL_ATTR = {name: attr for attr, name in GLOBAL_NAMES.items()}

GB = 1e9
RESERVE_BYTES = 512 << 20   # allocator slack, cuBLAS/Triton workspaces, kernels' scratch


def canonical(device: str | torch.device) -> torch.device:
    """With an index, so that it compares equal to a tensor's .device ("cuda" -> "cuda:0")."""
    device = torch.device(device)
    if device.index is None and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if device.index is None and device.type not in ("cpu", "meta"):
        return torch.device(device.type, 0)
    return device


_CUDA = re.compile(r"cuda:?(\d*)")


def parse_device(text: str, flag: str = "-ot") -> torch.device:
    """llama.cpp buffer names (CPU, CUDA0) or torch names (cpu, cuda, cuda:1, mps). Only the
    spelling is checked here (planning works for any device); `check_available` asks the
    machine."""
    t = text.strip().lower()
    if t in ("cpu", "cuda_host"):
        return torch.device("cpu")
    m = _CUDA.fullmatch(t)
    if m:
        return torch.device("cuda", int(m.group(1) or 0))
    if t in ("mps", "metal", "mtl0"):
        return torch.device("mps", 0)
    names = "auto, cpu, none, CUDA0 (or cuda:N) or mps" if flag == "-dev" else \
        "CPU, CUDA0 (or cuda:N) or mps"
    raise InputError(f"{flag}: unknown device {text!r}",
                     fix=f"use {names}; --list-devices shows this machine's")


def cuda_count() -> int:
    """CUDA devices torch can use here (0 without a CUDA build or driver)."""
    try:
        # is_available() implies one device at least (a test double may set only that)
        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):
        return 0


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_available(device: torch.device, flag: str, text: str | None = None) -> None:
    """InputError (one line) unless `device` exists on this machine."""
    shown = text if text is not None else str(device)
    if device.type == "cuda":
        n = cuda_count()
        if n == 0:
            fix = "put those tensors on CPU" if flag == "-ot" else "use cpu, or leave -dev at auto"
            raise InputError(f"{flag} {shown}: no CUDA device is available on this machine",
                             fix=f"{fix}; --list-devices shows the devices")
        if (device.index or 0) >= n:
            have = ", ".join(f"CUDA{i}" for i in range(n))
            raise InputError(f"{flag} {shown}: this machine has {n} CUDA device"
                             f"{'s' * (n != 1)} ({have})", fix=f"use one of {have}")
    elif device.type == "mps" and not mps_available():
        raise InputError(f"{flag} {shown}: MPS is not available on this machine", fix="use cpu")


def parse_device_list(text: str, flag: str = "-dev") -> tuple[str, str | None]:
    """llama.cpp's `-dev dev1,dev2,..` (or one torch name): the device diffcli runs on, as a
    torch name ("auto", "cpu", "cuda:N", "mps"), and a note when the list named more than
    one accelerator (diffcli offloads to one). `none` means no offload (the CPU), as in
    llama.cpp. Unknown names and devices this machine lacks are InputErrors."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise InputError(f"{flag}: no device given", fix="use auto, cpu, none, CUDA0 or mps")
    if len(parts) == 1 and parts[0].lower() in ("auto", ""):
        return "auto", None
    if len(parts) == 1 and parts[0].lower() == "none":
        return "cpu", None
    if any(not p or p.lower() in ("auto", "none") for p in parts):
        raise InputError(f"{flag} {text}: auto and none stand alone, not in a list",
                         fix="write e.g. -dev CUDA0 or -dev none")
    named: dict[torch.device, str] = {}
    for part in parts:
        dev = parse_device(part, flag)
        check_available(dev, flag, part)
        named.setdefault(dev, part)
    accels = [d for d in named if d.type != "cpu"]
    if not accels:
        return "cpu", None
    first = accels[0]
    bare = _CUDA.fullmatch(named[first].strip().lower())
    if first.type == "mps":
        name = "mps"
    elif bare and not bare.group(1):
        name = "cuda"                     # no index given: torch's current device
    else:
        name = f"cuda:{first.index or 0}"
    note = None
    if len(accels) > 1:
        note = (f"diffcli: {flag} {text}: diffcli offloads to one device; using {named[first]}")
    return name, note


def check_overrides_available(patterns: Iterable[str]) -> None:
    """Every -ot device exists here (planning alone accepts any; loading would fail inside torch)."""
    for item in patterns:
        for part in str(item).split(","):
            regex, sep, dev = part.rpartition("=")
            if sep and regex:
                check_available(parse_device(dev), "-ot", part)


def list_devices() -> list[str]:
    """llama.cpp's --list-devices lines: every accelerator with its memory."""
    lines = []
    for i in range(cuda_count()):
        try:
            free, total = torch.cuda.mem_get_info(i)
            mem = f" ({total >> 20} MiB, {free >> 20} MiB free)"
        except RuntimeError:
            mem = ""
        lines.append(f"  CUDA{i}: {torch.cuda.get_device_name(i)}{mem}")
    if mps_available():
        lines.append("  MPS: Apple Metal (memory shared with the CPU)")
    return lines


def parse_overrides(patterns: Iterable[str]) -> list[tuple[re.Pattern, torch.device]]:
    """'REGEX=DEV' strings (llama.cpp also accepts several joined by commas)."""
    out = []
    for item in patterns:
        for part in str(item).split(","):
            if not part.strip():
                continue
            regex, sep, dev = part.rpartition("=")
            if not sep or not regex:
                raise InputError(f"-ot {part!r} is not PATTERN=DEVICE",
                                 fix='write e.g. -ot "blk\\.1[0-9]\\.ffn_.*_exps=CPU"')
            try:
                out.append((re.compile(regex), parse_device(dev)))
            except re.error as exc:
                raise InputError(f"-ot {part!r}: bad regular expression ({exc})",
                                 fix="check the pattern (Python re syntax)") from None
    return out


def attr_of(name: str) -> tuple[int | None, str | None]:
    """GGUF name -> (layer index or None, model attribute or None if the model does not read it)."""
    m = _LAYER.match(name)
    if m is None:
        return None, _GLOBAL_ATTR.get(name)
    return int(m.group(1)), _SUFFIX_ATTR.get(name[m.end():])


@dataclass
class Plan:
    """Device of every layer, of the head, and of every tensor (GGUF name)."""
    accel: torch.device
    layers: list[torch.device]
    head: torch.device
    tensors: dict[str, torch.device]

    def on(self, device: torch.device) -> list[str]:
        return [n for n, d in self.tensors.items() if d == device]


def plan_placement(names: Iterable[str], n_layer: int, accel: torch.device | str,
                   n_gpu_layers: int = -1, n_cpu_moe: int = 0,
                   override_tensor: Iterable[str] = ()) -> Plan:
    """The placement of every tensor named, from the flags alone (no file access)."""
    accel, cpu = canonical(accel), torch.device("cpu")
    n_gpu = n_layer if n_gpu_layers < 0 else min(n_gpu_layers, n_layer)
    layers = [accel if i >= n_layer - n_gpu else cpu for i in range(n_layer)]
    head = accel if n_gpu > 0 else cpu
    overrides = parse_overrides(override_tensor)
    tensors: dict[str, torch.device] = {}
    for name in names:
        i, attr = attr_of(name)
        home = head if i is None else layers[i] if i < n_layer else cpu
        dev = home
        if attr in QUANTIZED:
            if attr in EXPERT_ATTRS and i is not None and i < (n_cpu_moe or 0):
                dev = cpu
            for regex, target in overrides:
                if regex.search(name):
                    dev = target
                    break
        tensors[name] = dev
    for i in range(n_layer):      # a layer's two expert tensors share one device
        pair = [f"blk.{i}.{LAYER_NAMES[a].split('}.', 1)[1]}" for a in EXPERT_ATTRS]
        devs = {tensors[p] for p in pair if p in tensors}
        if len(devs) > 1:
            dev = cpu if cpu in devs else tensors[pair[0]]
            for p in pair:
                tensors[p] = dev
    return Plan(accel, layers, head, tensors)


# ---- memory preflight ---------------------------------------------------------------------

def device_bytes(infos, plan: Plan, device: torch.device, *, act_bytes: int = 2,
                 canvas: int = 256, prefix: int = 2048, window: int = 1024) -> int:
    """Bytes a run needs on `device` under `plan`: weights + workspace for one canvas.

    infos: GGUF tensor infos (.name, .shape, .qtype, .nbytes) of the whole file. Counted:
    - quantized matrices: their raw bytes (they stay quantized on the device);
    - other tensors: float32 copies (norms, scales, router);
    - the head, if there: the dense [V, H] embedding in the activation dtype (kept with
      cache_embedding, rebuilt per self-conditioned step without it: the peak is the same), and
      four float32 [C, V] buffers (logits, softcap, SC probabilities, the loop's previous logits)
      plus the SC probabilities cast to the activation dtype;
    - each layer there: its KV cache for `prefix` committed tokens (sliding layers keep W-1)
      plus the canvas' keys, and the largest layer's attention scores [Nq, C, L] in float32
      (one layer's exist at a time);
    - RESERVE_BYTES of slack.
    Shapes come from the tensors (V, H from token_embd; K/V width from attn_k; a layer is
    sliding when it has attn_v), so this needs no config object.
    """
    device = canonical(device)
    if device not in plan.layers and device != plan.head and device not in plan.tensors.values():
        return 0
    total, kv_width, q_width, head_dim, sliding = 0, {}, {}, {}, set()
    V = H = 0
    for info in infos:
        dev = plan.tensors.get(info.name)
        i, attr = attr_of(info.name)
        if dev is None or attr is None:
            continue
        if attr in QUANTIZED:
            total += info.nbytes if dev == device else 0
        elif (plan.head if i is None else plan.layers[i]) == device:
            total += 4 * _numel(info.shape)
        if attr == "wk":
            kv_width[i] = info.shape[0]                 # Nkv * D
        elif attr == "wq":
            q_width[i] = info.shape[0]                  # Nq * D
        elif attr == "q_norm":
            head_dim[i] = info.shape[-1]                # D
        elif attr == "wv":
            sliding.add(i)
        elif attr == "embed":
            V, H = info.shape
    if plan.head == device:
        total += V * H * act_bytes + canvas * V * (4 * 4 + act_bytes)
    scores = 0
    for i, width in kv_width.items():
        if plan.layers[i] != device:
            continue
        kept = min(prefix, window - 1) if i in sliding else prefix
        total += 2 * width * (kept + canvas) * act_bytes                  # K and V
        n_q = q_width.get(i, 0) // max(head_dim.get(i, 1), 1)
        scores = max(scores, 4 * n_q * canvas * (kept + canvas))          # [Nq, C, L], one layer
    return total + scores + RESERVE_BYTES


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def free_bytes(device: torch.device) -> int | None:
    """Free memory on a device, or None where it cannot be asked (CPU, MPS). Tests replace it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def suggest(infos, n_layer: int, accel: torch.device, free: int, *, n_gpu_layers: int = -1,
            n_cpu_moe: int = 0, override_tensor=(), **sizes) -> str:
    """The largest -ngl (other flags kept) and the smallest --n-cpu-moe (with the given -ngl)
    whose placement fits in `free` bytes on `accel`."""
    names = [i.name for i in infos]

    def need(ngl: int, ncm: int) -> int:
        plan = plan_placement(names, n_layer, accel, ngl, ncm, override_tensor)
        return device_bytes(infos, plan, accel, **sizes)

    n_gpu = n_layer if n_gpu_layers < 0 else min(n_gpu_layers, n_layer)
    ngl = next((n for n in range(n_gpu - 1, 0, -1) if need(n, n_cpu_moe) <= free), 0)
    ncm = next((n for n in range(n_cpu_moe + 1, n_layer + 1) if need(n_gpu_layers, n) <= free),
               None)
    tips = [f"-ngl {ngl}" if ngl else "-ngl 0 (CPU only)"]
    if ncm is not None:
        tips.append(f"--n-cpu-moe {ncm}")
    return "try " + " or ".join(tips)


def check_fits(f, cfg, plan: Plan, act: dict, **flags) -> None:
    """The preflight: before any byte goes to an accelerator, compare what the placement needs
    there with its free memory; raise InputError (one line, with a placement that fits)."""
    infos = [f.info(n) for n in f.tensor_names]
    for device in sorted({plan.head, *plan.layers, *plan.tensors.values()}, key=str):
        free = None if device.type == "cpu" else free_bytes(device)
        if free is None:
            continue
        sizes = dict(act_bytes=act[device].itemsize, canvas=int(cfg.canvas_length),
                     window=int(cfg.sliding_window))
        need = device_bytes(infos, plan, device, **sizes)
        if need <= free:
            continue
        if device == plan.accel:
            fix = suggest(infos, cfg.n_layer, device, free, **flags, **sizes)
        else:
            fix = "place fewer tensors there with -ot"
        raise InputError(f"needs {need / GB:.1f} GB on {device} but {free / GB:.1f} GB is free",
                         path=f.path, fix=fix)
