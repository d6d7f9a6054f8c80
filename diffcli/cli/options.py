"""The flags of `diffcli run` as the `RunOptions` dataclass they parse into, and its checks
(the Click declarations of those flags are in run_flags.py).

Names, forms and defaults mirror llama-diffusion-cli (llama.cpp PR #24423, spec §C.8, and
llama.cpp's common/arg.cpp for the common flags): `-sysf`, `-no-cnv`, `-cmoe`, `-ngl all`,
`-fit on`, `-e/--no-escape` and the rest parse as there (see flags.py for the parser). Flags that
only matter to llama.cpp's legacy masked-diffusion path, to its other samplers or to its memory
planner are accepted so that command lines can be pasted unchanged, and say so in --help and in
one log line when given. A value llama.cpp gives a meaning to (`-t 0`, `--diffusion-eb-max-steps
0`) is followed and logged; a value it does not define (`-n 0`, `-n -5`) is refused in one line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError
from .text_input import process_escapes, read_text_file, utf8_text

DEFAULT_SEED = 0xFFFFFFFF
LEGACY = {  # flag: (dest, default) — llama.cpp's masked-diffusion (Dream/LLaDA) path only
    "--diffusion-steps": ("diffusion_steps", 128), "--diffusion-eps": ("diffusion_eps", 0.0),
    "--diffusion-algorithm": ("diffusion_algorithm", 4), "--diffusion-alg-temp": ("diffusion_alg_temp", 0.0),
    "--diffusion-block-length": ("diffusion_block_length", 0),
    "--diffusion-cfg-scale": ("diffusion_cfg_scale", 0.0),
    "--diffusion-add-gumbel-noise": ("diffusion_add_gumbel_noise", None),
}
IGNORED = {  # dest: (default, why it has no effect in diffcli)
    "temp": (None, "the entropy-bound sampler has its own temperature schedule (as in llama.cpp)"),
    "top_k": (None, "the entropy-bound sampler does not use it (as in llama.cpp)"),
    "top_p": (None, "the entropy-bound sampler does not use it (as in llama.cpp)"),
    "min_p": (None, "the entropy-bound sampler does not use it (as in llama.cpp)"),
    "repeat_penalty": (None, "the entropy-bound sampler does not use it (as in llama.cpp)"),
    "flash_attn": ("auto", "diffcli picks its attention kernel itself"),
    "cache_type_k": (None, "the encoder cache is kept in the activation dtype"),
    "cache_type_v": (None, "the encoder cache is kept in the activation dtype"),
    "threads_batch": (None, "diffcli uses one thread pool (-t)"),
    "mlock": (False, "the weights stay memory-mapped"),
    "check_tensors": (False, "tensor shapes and types are always validated at load"),
    "fit": ("off", "diffcli does not shrink a placement by itself; one that does not fit is "
                   "refused with a -ngl / --n-cpu-moe that does"),
    "diffusion_gpu_sampling": ("auto", "diffcli always keeps the canvas logits on the model's device"),
    "diffusion_gpu_sample_reduce": ("auto", "diffcli always reduces on the model's device"),
}
# llama.cpp's --cpu-moe: every expert matrix on the CPU (an -ot rule after the user's own)
CPU_MOE_RULE = r"\.ffn_(gate_up|down)_exps\.weight$=CPU"
# the sampler flags' "not given" value (llama.cpp's: the GGUF key, else the default, is used)
EB_UNSET = {"diffusion_eb_max_steps": (0, -1), "diffusion_eb_t_max": (-1,),
            "diffusion_eb_t_min": (-1,), "diffusion_eb_entropy_bound": (-1,),
            "diffusion_eb_stability": (-1,), "diffusion_eb_confidence": (-1,)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class RunOptions:
    model: str | None = None
    prompt: str | None = None
    file: str | None = None
    system: str | None = None
    system_file: str | None = None
    conversation: bool = False
    escape: bool = True
    n_predict: int = -1
    ignore_eos: bool = False
    n_gpu_layers: int = -1
    ctx_size: int = 0
    batch_size: int = 2048
    ubatch_size: int = 512
    threads: int | None = None
    seed: int = DEFAULT_SEED
    override_tensor: tuple[str, ...] = ()
    n_cpu_moe: int | None = None
    cpu_moe: bool = False
    no_mmap: bool = False
    verbose: bool = False
    log_verbosity: int | None = None
    log_disable: bool = False
    log_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    no_cuda_graphs: bool = False
    # -hf: a GGUF from the Hugging Face hub (hub.py)
    hf_repo: str | None = None
    hf_file: str | None = None
    hf_token: str | None = None
    offline: bool = False
    # entropy-bound sampler: None = take the GGUF key, else the default (§C.1)
    diffusion_eb: str = "auto"
    diffusion_eb_max_steps: int | None = None
    diffusion_eb_t_max: float | None = None
    diffusion_eb_t_min: float | None = None
    diffusion_eb_entropy_bound: float | None = None
    diffusion_eb_stability: int | None = None
    diffusion_eb_confidence: float | None = None
    diffusion_kv_cache: str = "auto"
    diffusion_blocks: int = 1
    diffusion_visual: bool = False
    diffusion_visual_progress: bool = False
    diffusion_visual_interval: int = 1
    # chat
    think: bool = False
    show_thinking: bool = False
    chat_template_kwargs: str | None = None
    reasoning_budget: int | None = None
    chat_template_file: str | None = None
    no_chat_template: bool = False
    # images (llama-mtmd-cli's flags)
    mmproj: str | None = None
    image: tuple[str, ...] = ()
    image_max_tokens: int = 280
    # output
    json: bool = False
    trace: str | None = None
    force: bool = False                                    # --force: --trace may overwrite
    no_perf: bool = False
    extra: dict[str, Any] = field(default_factory=dict)   # accepted-but-ignored and legacy flags
    prompt_text: str | None = None                         # filled in once the prompt is read
    notes: list[str] = field(default_factory=list)        # values replaced, one log line each
    _validated: bool = field(default=False, repr=False)

    @classmethod
    def from_click(cls, kwargs: dict[str, Any]) -> "RunOptions":
        names = {f.name for f in fields(cls)} - {"extra", "notes", "_validated", "prompt_text"}
        known = {k: v for k, v in kwargs.items() if k in names}
        extra = {k: v for k, v in kwargs.items() if k not in names}
        known["override_tensor"] = tuple(known.get("override_tensor") or ())
        known["image"] = tuple(known.get("image") or ())
        return cls(**known, extra=extra)

    def validate(self) -> None:
        """Check every flag (one InputError line for the first bad one), apply llama.cpp's
        meanings (escapes in -p, -sysf, -t <= 0, -dev lists, --cpu-moe; each value replaced
        noted in `notes`), then fetch an -hf model. Runs once; later calls return at once."""
        if self._validated:
            return

        def bad(flag: str, value: Any, fix: str) -> InputError:
            return InputError(f"bad value for {flag}: {value!r}", fix=fix)

        if self.model is None and self.hf_repo is None:
            raise InputError("no model given", fix="pass -m FILE.gguf, or -hf USER/REPO[:QUANT] "
                             "to download one from Hugging Face")
        if self.model is not None and self.hf_repo is not None:
            raise InputError("both -m and -hf were given", fix="pass the model one way")
        if self.hf_repo is None and self.hf_file is not None:
            raise InputError("-hff names a file of an -hf repository", fix="add -hf USER/REPO")
        if self.prompt is not None and self.file is not None:
            raise InputError("both -p and -f were given", fix="pass the prompt one way")
        if self.system is not None and self.system_file is not None:
            raise InputError("both -sys and -sysf were given", fix="pass the system prompt one way")
        if self.diffusion_eb.lower() == "off":
            raise InputError("--diffusion-eb off selects llama.cpp's legacy masked-diffusion decoder, "
                             "which diffcli does not implement", fix="leave it at auto or on")
        if self.diffusion_blocks < 1:
            raise bad("--diffusion-blocks", self.diffusion_blocks, "use 1 or more")
        if self.diffusion_visual_interval < 1:
            raise bad("--diffusion-visual-interval", self.diffusion_visual_interval, "use 1 or more")
        if self.ctx_size < 0:
            raise bad("-c/--ctx-size", self.ctx_size, "use 0 (the model's context) or a positive size")
        if self.n_predict == 0 or self.n_predict < -1:
            raise bad("-n/--predict", self.n_predict, "use a number of tokens > 0, or -1 for "
                      "--diffusion-blocks canvases (llama.cpp's -1 = no limit)")
        if self.n_gpu_layers < -1:
            raise bad("-ngl/--n-gpu-layers", self.n_gpu_layers, "use a number of layers >= 0, "
                      "all, or auto (-1)")
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise bad("-ncmoe/--n-cpu-moe", self.n_cpu_moe, "use a number of layers >= 0")
        if self.reasoning_budget is not None and self.reasoning_budget < -1:
            raise bad("--reasoning-budget", self.reasoning_budget,
                      "use -1 (thinking on, no budget), 0 (thinking off) or N > 0")
        if not 0 <= self.seed <= 0xFFFFFFFFFFFFFFFF:
            raise bad("-s/--seed", self.seed, "use a non-negative integer (-1 means 4294967295)")
        self._check_sampler_values()
        self.template_kwargs()          # parse errors surface before the model loads
        if self.chat_template_file is not None and not Path(self.chat_template_file).is_file():
            raise InputError("no such file", path=self.chat_template_file,
                             fix="check the --chat-template-file path")
        if self.trace is not None and Path(self.trace).is_dir():
            raise InputError("is a directory", path=self.trace, fix="give --trace a file name")
        if self.image and self.mmproj is None and self.hf_repo is None:
            raise InputError("--image needs the vision tower", fix="add --mmproj mmproj-*.gguf "
                             "(made with `diffcli convert HF_DIR --mmproj`)")
        self._place()
        self._threads()
        if self.system_file is not None:
            self.system = read_text_file(self.system_file, "-sysf")
        if self.escape and self.prompt is not None and self.prompt != "-":
            self.prompt = process_escapes(utf8_text(self.prompt, "-p"))
        if self.think and self.reasoning_budget == 0:
            self.notes.append("diffcli: --reasoning-budget 0 turns thinking off; it overrides "
                              "--think")
        if self.hf_repo is not None:
            from .hub import resolve
            got = resolve(self.hf_repo, self.hf_file, token=self.hf_token, offline=self.offline,
                          mmproj=bool(self.image) and self.mmproj is None)
            self.model = got.model
            if got.mmproj is not None:
                self.mmproj = got.mmproj
            elif self.image and self.mmproj is None:
                raise InputError(f"--image needs the vision tower, and -hf {self.hf_repo} has no "
                                 "mmproj file", fix="add --mmproj mmproj-*.gguf")
        self._validated = True

    def _check_sampler_values(self) -> None:
        """llama.cpp takes a --diffusion-eb-* value only when it is given (>= 0; > 0 for max
        steps), else the GGUF key, else the default: its "not given" values (-1; 0 or -1 for
        max steps) are followed and logged; any other negative value is refused."""
        for dest, unset in EB_UNSET.items():
            value = getattr(self, dest)
            if value is None:
                continue
            if value in unset:
                setattr(self, dest, None)
                self.notes.append(f"diffcli: {_flag(dest)} {value:g} means not given: the GGUF's "
                                  "value, else the default, is used (as in llama.cpp)")
            elif value < 0:
                lowest = 1 if dest == "diffusion_eb_max_steps" else 0
                raise InputError(f"bad value for {_flag(dest)}: {value:g}",
                                 fix=f"use {lowest} or more, or {unset[-1]} for the GGUF's value")

    def _place(self) -> None:
        from ..model.placement import check_overrides_available, parse_device_list
        device, note = parse_device_list(self.device, "-dev")
        self.device = device
        if note:
            self.notes.append(note)
        check_overrides_available(self.override_tensor)
        if self.cpu_moe:
            self.override_tensor = (*self.override_tensor, CPU_MOE_RULE)

    def _threads(self) -> None:
        cpus = usable_cpus()
        if self.threads is None:
            self.threads = -1                     # torch's default
        elif self.threads <= 0:
            self.notes.append(f"diffcli: -t {self.threads}: using all {cpus} CPUs "
                              "(llama.cpp's meaning of N <= 0)")
            self.threads = cpus
        elif self.threads > cpus:
            self.notes.append(f"diffcli: warning: -t {self.threads} is more threads than the "
                              f"{cpus} CPUs this process may use; each step waits for the extra "
                              f"ones (try -t {cpus})")

    def sampler_overrides(self) -> dict[str, Any]:
        # llama.cpp takes a CLI value only when it is >= 0 (> 0 for max steps), else the GGUF key
        def given(v, strict=False):
            return None if v is None or v < 0 or (strict and v == 0) else v
        return {"max_steps": given(self.diffusion_eb_max_steps, strict=True),
                "t_max": given(self.diffusion_eb_t_max), "t_min": given(self.diffusion_eb_t_min),
                "entropy_bound": given(self.diffusion_eb_entropy_bound),
                "stability": given(self.diffusion_eb_stability),
                "confidence": given(self.diffusion_eb_confidence)}

    def template_kwargs(self) -> dict[str, Any]:
        if not self.chat_template_kwargs:
            return {}
        try:
            value = json.loads(self.chat_template_kwargs)
        except json.JSONDecodeError as exc:
            raise InputError(f"--chat-template-kwargs is not valid JSON ({exc.msg})",
                             fix="""pass an object such as '{"enable_thinking": true}'""") from None
        if not isinstance(value, dict):
            raise InputError("--chat-template-kwargs must be a JSON object",
                             fix="""pass an object such as '{"enable_thinking": true}'""")
        return value

    def thinking_enabled(self) -> bool:
        if self.reasoning_budget == 0:
            return False
        return self.think or self.reasoning_budget is not None

    def chat_template_source(self, from_file: str | None) -> str | None:
        if self.chat_template_file is not None:
            return Path(self.chat_template_file).read_text(encoding="utf-8")
        return from_file

    def eog_ids(self, tokenizer) -> tuple[int, ...]:
        """The ids that end a reply: none with --ignore-eos (llama.cpp's meaning)."""
        return () if self.ignore_eos else tuple(tokenizer.eog_ids)

    def ignored_notes(self) -> list[str]:
        notes = list(self.notes)
        for dest, (default, why) in IGNORED.items():
            value = self.extra.get(dest, default)
            if value not in (default, None, False):
                notes.append(f"diffcli: --{dest.replace('_', '-')} {value} is ignored: {why}")
        for flag, (dest, default) in LEGACY.items():
            value = self.extra.get(dest)
            if value is not None and value != default:
                notes.append(f"diffcli: {flag} only applies to llama.cpp's legacy masked-diffusion "
                             "models; no effect on canvas models")
        if self.reasoning_budget is not None and self.reasoning_budget > 0:
            notes.append("diffcli: --reasoning-budget N > 0 turns thinking on; the budget itself is "
                         "not enforced (the canvas length bounds each reply)")
        return notes
