"""The flags of `diffcli run`, as Click options and as the `RunOptions` dataclass they parse into.

Names and defaults mirror llama-diffusion-cli (llama.cpp PR #24423, spec §C.8). Flags that only
matter to llama.cpp's legacy masked-diffusion path or to its memory planner are accepted so that
command lines can be pasted unchanged, and say so in --help and in one log line when given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from ..errors import InputError

DEFAULT_SEED = 0xFFFFFFFF
AUTO_ON_OFF = click.Choice(["auto", "on", "off"], case_sensitive=False)
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
    "flash_attn": ("auto", "diffcli picks its attention kernel itself"),
    "cache_type_k": (None, "the encoder cache is kept in the activation dtype"),
    "cache_type_v": (None, "the encoder cache is kept in the activation dtype"),
    "threads_batch": (None, "diffcli uses one thread pool (-t)"),
    "mlock": (False, "the weights stay memory-mapped"),
    "check_tensors": (False, "tensor shapes and types are always validated at load"),
    "fit": (False, "it has no effect (as in llama.cpp's diffusion runner)"),
    "diffusion_gpu_sampling": ("auto", "diffcli always keeps the canvas logits on the model's device"),
    "diffusion_gpu_sample_reduce": ("auto", "diffcli always reduces on the model's device"),
}


@dataclass
class RunOptions:
    model: str
    prompt: str | None = None
    file: str | None = None
    system: str | None = None
    conversation: bool = False
    n_predict: int = -1
    n_gpu_layers: int = -1
    ctx_size: int = 0
    batch_size: int = 2048
    ubatch_size: int = 512
    threads: int = -1
    seed: int = DEFAULT_SEED
    override_tensor: tuple[str, ...] = ()
    n_cpu_moe: int | None = None
    no_mmap: bool = False
    verbose: bool = False
    device: str = "auto"
    dtype: str = "auto"
    no_cuda_graphs: bool = False
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

    @classmethod
    def from_click(cls, kwargs: dict[str, Any]) -> "RunOptions":
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in kwargs.items() if k in names}
        extra = {k: v for k, v in kwargs.items() if k not in names}
        known["override_tensor"] = tuple(known.get("override_tensor") or ())
        known["image"] = tuple(known.get("image") or ())
        return cls(**known, extra=extra)

    def validate(self) -> None:
        def bad(flag: str, value: Any, fix: str) -> InputError:
            return InputError(f"bad value for {flag}: {value!r}", fix=fix)

        if self.prompt is not None and self.file is not None:
            raise InputError("both -p and -f were given", fix="pass the prompt one way")
        if self.diffusion_eb.lower() == "off":
            raise InputError("--diffusion-eb off selects llama.cpp's legacy masked-diffusion decoder, "
                             "which diffcli does not implement", fix="leave it at auto or on")
        if self.diffusion_blocks < 1:
            raise bad("--diffusion-blocks", self.diffusion_blocks, "use 1 or more")
        if self.diffusion_visual_interval < 1:
            raise bad("--diffusion-visual-interval", self.diffusion_visual_interval, "use 1 or more")
        if self.ctx_size < 0:
            raise bad("-c/--ctx-size", self.ctx_size, "use 0 (the model's context) or a positive size")
        if not 0 <= self.seed <= 0xFFFFFFFFFFFFFFFF:
            raise bad("-s/--seed", self.seed, "use a non-negative integer (-1 means 4294967295)")
        self.template_kwargs()          # parse errors surface before the model loads
        if self.chat_template_file is not None and not Path(self.chat_template_file).is_file():
            raise InputError("no such file", path=self.chat_template_file,
                             fix="check the --chat-template-file path")
        if self.trace is not None and Path(self.trace).is_dir():
            raise InputError("is a directory", path=self.trace, fix="give --trace a file name")
        if self.image and self.mmproj is None:
            raise InputError("--image needs the vision tower", fix="add --mmproj mmproj-*.gguf "
                             "(made with `diffcli convert HF_DIR --mmproj`)")

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

    def ignored_notes(self) -> list[str]:
        notes = []
        for dest, (default, why) in IGNORED.items():
            value = self.extra.get(dest, default)
            if value not in (default, None, False):
                notes.append(f"diffcli: --{dest.replace('_', '-')} {value} is ignored: {why}")
        for flag, (dest, default) in LEGACY.items():
            value = self.extra.get(dest)
            if value is not None and value != default:
                notes.append(f"diffcli: {flag} only applies to llama.cpp's legacy masked-diffusion "
                             "models; no effect on canvas models")
        if self.reasoning_budget not in (None, 0, -1):
            notes.append("diffcli: --reasoning-budget N > 0 turns thinking on; the budget itself is "
                         "not enforced (the canvas length bounds each reply)")
        return notes


def _seed(ctx, param, value):
    if value is None:
        return DEFAULT_SEED
    return DEFAULT_SEED if value == -1 else value


def click_options(f):
    """Decorate the run command with every flag (listed in --help in this order)."""
    opts = [
        # model and prompt
        click.option("-m", "--model", required=True, type=click.Path(dir_okay=True),
                     help="GGUF model file (diffusion-gemma)."),
        click.option("-p", "--prompt", help="Prompt text; '-' reads it from stdin (as does a "
                     "piped stdin when -p is not given)."),
        click.option("-f", "--file", help="Read the prompt from FILE."),
        click.option("-sys", "--system-prompt", "system", help="System prompt."),
        click.option("-cnv", "--conversation", is_flag=True,
                     help="Chat mode: '> ' prompt, /help, /clear, /exit; -p is the first turn."),
        click.option("-n", "--n-predict", type=int, default=-1, show_default=True,
                     help="Tokens to generate: ceil(n/canvas) canvases; -1 = --diffusion-blocks."),
        # entropy-bound sampler
        click.option("--diffusion-eb", type=AUTO_ON_OFF, default="auto", show_default=True,
                     help="Entropy-bound decoder (auto = on for canvas models; off is not supported)."),
        click.option("--diffusion-eb-max-steps", type=int, metavar="N",
                     help="Max denoising steps per canvas [GGUF key, else 48]."),
        click.option("--diffusion-eb-t-max", type=float, metavar="F",
                     help="Temperature of the first step [GGUF key, else 0.8]."),
        click.option("--diffusion-eb-t-min", type=float, metavar="F",
                     help="End point of the temperature schedule [GGUF key, else 0.4]."),
        click.option("--diffusion-eb-entropy-bound", type=float, metavar="F",
                     help="Acceptance bound on summed entropy [GGUF key, else 0.1]."),
        click.option("--diffusion-eb-stability", type=int, metavar="N",
                     help="Steps the argmax must stay unchanged to stop [GGUF key, else 1]."),
        click.option("--diffusion-eb-confidence", type=float, metavar="F",
                     help="Mean-entropy stop threshold [GGUF key, else 0.005]."),
        click.option("--diffusion-kv-cache", type=AUTO_ON_OFF, default="auto", show_default=True,
                     help="Encode the prefix once (on/auto) or re-run it every step (off, ~2x slower)."),
        click.option("--diffusion-gpu-sampling", type=AUTO_ON_OFF, default="auto", show_default=True,
                     help="Accepted; diffcli always keeps canvas logits on the device."),
        click.option("--diffusion-gpu-sample-reduce", type=AUTO_ON_OFF, default="auto",
                     show_default=True, help="Accepted; reductions always run on the device."),
        click.option("--diffusion-blocks", type=int, default=1, show_default=True, metavar="N",
                     help="Canvases to generate when -n is not given."),
        click.option("--diffusion-visual", is_flag=True,
                     help="Live canvas view (terminal only): accepted / renoised / settled positions, "
                     "entropy shading, status line."),
        click.option("--diffusion-visual-progress", is_flag=True,
                     help="Add a progress-bar line to the live view."),
        click.option("--diffusion-visual-interval", type=int, default=1, show_default=True,
                     metavar="N", help="Redraw the live view every N-th step."),
        # legacy masked-diffusion flags
        *[click.option(flag, dest, default=None, metavar="V",
                       help=f"Legacy masked-diffusion flag (llama.cpp default {default}); "
                       "accepted, no effect on canvas models.")
          for flag, (dest, default) in LEGACY.items()],
        # chat and thinking
        click.option("--think", is_flag=True, help="Enable thinking (off by default)."),
        click.option("--show-thinking", is_flag=True,
                     help="Print the thought channel too (hidden by default)."),
        click.option("--chat-template-kwargs", metavar="JSON",
                     help="""Extra template variables, e.g. '{"enable_thinking":true}'."""),
        click.option("--reasoning-budget", type=int, metavar="N",
                     help="0 = thinking off; -1 or N > 0 = thinking on (N is not enforced)."),
        click.option("--chat-template-file", metavar="FILE",
                     help="Use this Jinja chat template instead of the GGUF's."),
        click.option("--no-chat-template", is_flag=True,
                     help="Feed the prompt text as is (BOS + text), no chat template."),
        # images
        click.option("--mmproj", metavar="FILE",
                     help="Vision tower (mmproj GGUF) for --image and /image."),
        click.option("--image", multiple=True, metavar="FILE",
                     help="Image for the prompt (repeatable); placed at <__media__> markers in "
                     "the prompt, else before the text."),
        click.option("--image-max-tokens", type=click.Choice(["70", "140", "280", "560", "1120"]),
                     default="280", show_default=True, callback=lambda c, p, v: int(v),
                     help="Soft tokens per image (the Gemma 4 processor's budgets)."),
        # output
        click.option("--json", "json", is_flag=True,
                     help="Print one JSON object per reply (text, thinking, tokens, seed, stats)."),
        click.option("--trace", metavar="FILE.jsonl",
                     help="Write every step (argmax canvas, accepted mask, entropies) as JSON lines."),
        click.option("--force", is_flag=True,
                     help="Let --trace overwrite an existing file (never an input of the run)."),
        click.option("--no-perf", is_flag=True, help="Do not print the end-of-turn statistics."),
        click.option("-s", "--seed", type=int, default=None, callback=_seed,
                     help="RNG seed [default 4294967295 = 0xFFFFFFFF: deterministic, as llama.cpp; "
                     "-1 means the same]."),
        click.option("--verbose", is_flag=True, help="Tracebacks on errors."),
        # placement and resources
        click.option("--device", "-dev", "device", default="auto", show_default=True,
                     help="auto | cpu | cuda | cuda:N | mps (llama.cpp names like CUDA0 work)."),
        click.option("--dtype", type=click.Choice(["auto", "f32", "bf16", "f16"]), default="auto",
                     show_default=True,
                     help="Activation dtype: auto = bf16 on GPUs and on CPUs with bf16 dot products "
                     "(AVX512-BF16/AMX), else f32; f32 reproduces transformers' fp32 logits."),
        click.option("--no-cuda-graphs", is_flag=True,
                     help="Run every denoising step eagerly instead of replaying a CUDA graph "
                     "(as DIFFCLI_CUDA_GRAPHS=0)."),
        click.option("-ngl", "--n-gpu-layers", "--gpu-layers", "n_gpu_layers", type=int, default=-1,
                     show_default=True,
                     help="Layers on the GPU, the last ones (-1 = all, 0 = CPU only); a placement "
                     "that does not fit the free GPU memory stops with a suggestion."),
        click.option("--n-cpu-moe", type=int, metavar="N",
                     help="Keep the experts of the first N layers on the CPU."),
        click.option("-ot", "--override-tensor", multiple=True, metavar="PATTERN=DEV",
                     help="Put tensors whose GGUF name matches PATTERN (a regex) on DEV "
                     "(CPU, CUDA0, cuda:N, mps); repeatable, first match wins."),
        click.option("--no-mmap", is_flag=True, help="Read the weights into memory instead of mapping."),
        click.option("--mlock", is_flag=True, help="Accepted; no effect."),
        click.option("--check-tensors", is_flag=True, help="Accepted; tensors are always checked."),
        click.option("-c", "--ctx-size", type=int, default=0, show_default=True,
                     help="Max total tokens (prompt + canvases); 0 = the model's context."),
        click.option("-b", "--batch-size", type=int, default=2048, show_default=True,
                     help="Accepted (llama.cpp sizing, logged); diffcli has no batch limit."),
        click.option("-ub", "--ubatch-size", type=int, default=512, show_default=True,
                     help="Accepted (llama.cpp sizing, logged); diffcli has no micro-batch limit."),
        click.option("-t", "--threads", type=int, default=-1, show_default=True,
                     help="CPU threads (-1 = torch's default)."),
        click.option("-tb", "--threads-batch", type=int, help="Accepted; no effect."),
        click.option("-fa", "--flash-attn", default="auto", help="Accepted; no effect."),
        click.option("-ctk", "--cache-type-k", help="Accepted; no effect."),
        click.option("-ctv", "--cache-type-v", help="Accepted; no effect."),
        click.option("--temp", type=float, help="Accepted; ignored by the entropy-bound sampler."),
        click.option("--top-k", type=int, help="Accepted; ignored by the entropy-bound sampler."),
        click.option("--top-p", type=float, help="Accepted; ignored by the entropy-bound sampler."),
        click.option("--fit", is_flag=True, help="Accepted; no effect."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f
