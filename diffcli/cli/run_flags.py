"""The Click declarations of `diffcli run`'s flags (shared by `diffcli serve`), each in its help
group; they parse into options.RunOptions, whose module says how they follow llama.cpp."""
from __future__ import annotations

import click

from .flags import FlagOption, LayerCount, Switch
from .options import DEFAULT_SEED, LEGACY

AUTO_ON_OFF = click.Choice(["auto", "on", "off"], case_sensitive=False)


def _seed(ctx, param, value):
    if value is None:
        return DEFAULT_SEED
    return DEFAULT_SEED if value == -1 else value


def _version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        from .flags import version
        click.echo(f"diffcli {version()}")
        ctx.exit(0)


def _list_devices(ctx, param, value):
    if value and not ctx.resilient_parsing:
        from ..model.placement import list_devices
        lines = list_devices()
        click.echo("Available devices:")
        click.echo("\n".join(lines) if lines else "  (none: diffcli runs on the CPU)")
        ctx.exit(0)


def click_options(f):
    """Decorate the run command with every flag, each in its help group (flags.GROUPS)."""
    M, G, S, D, C, X = ("model and placement", "generation", "sampler (entropy-bound)",
                        "display and output", "chat and thinking",
                        "accepted for compatibility (no effect)")

    def opt(group, *decls, **kw):
        return click.option(*decls, cls=FlagOption, group=group, **kw)

    def compat(*decls, **kw):
        kw.setdefault("help", "Accepted; no effect.")
        return opt(X, *decls, **kw)

    no_eb = "ignored by the entropy-bound sampler (as in llama.cpp)."
    opts = [
        # model and placement
        opt(M, "-m", "--model", type=click.Path(dir_okay=True), metavar="FILE",
            help="GGUF model file (diffusion-gemma)."),
        opt(M, "-hf", "-hfr", "--hf-repo", "hf_repo", metavar="USER/REPO[:QUANT]",
            help="Download the model from this Hugging Face repository into the hub cache and "
            "run it; QUANT (case-insensitive) picks the file, default Q4_K_M, else the repo's "
            "first GGUF (needs huggingface_hub)."),
        opt(M, "-hff", "--hf-file", "hf_file", metavar="FILE",
            help="The file of the -hf repository to use (overrides QUANT)."),
        opt(M, "-hft", "--hf-token", "hf_token", metavar="TOKEN", envvar="HF_TOKEN",
            help="Hugging Face access token [env HF_TOKEN]."),
        opt(M, "--offline", is_flag=True,
            help="-hf uses the hub cache only, no network (as HF_HUB_OFFLINE=1)."),
        opt(M, "--device", "-dev", "device", default="auto", show_default=True,
            metavar="DEV[,DEV..]",
            help="auto | cpu | none | CUDA0 (cuda:N) | mps; a llama.cpp list runs on its first "
            "GPU (diffcli offloads to one device)."),
        opt(M, "--list-devices", is_flag=True, expose_value=False, is_eager=True,
            callback=_list_devices, help="Print the GPUs diffcli can use and exit."),
        opt(M, "--dtype", type=click.Choice(["auto", "f32", "bf16", "f16"]), default="auto",
            show_default=True,
            help="Activation dtype: auto = bf16 on GPUs and on CPUs with bf16 dot products "
            "(AVX512-BF16/AMX), else f32; f32 reproduces transformers' fp32 logits."),
        opt(M, "-ngl", "--n-gpu-layers", "--gpu-layers", "n_gpu_layers", type=LayerCount(),
            default="-1", show_default=True, metavar="N|all|auto",
            help="Layers on the GPU, the last ones: N, all or auto (-1: every layer; 0 = CPU only); "
            "a placement that does not fit the free GPU memory stops with one that does."),
        opt(M, "--n-cpu-moe", "-ncmoe", type=int, metavar="N",
            help="Keep the experts of the first N layers on the CPU."),
        opt(M, "--cpu-moe", "-cmoe", is_flag=True, help="Keep every layer's experts on the CPU."),
        opt(M, "-ot", "--override-tensor", multiple=True, metavar="PATTERN=DEV",
            help="Put tensors whose GGUF name matches PATTERN (a regex) on DEV "
            "(CPU, CUDA0, cuda:N, mps); repeatable, first match wins."),
        opt(M, "--no-mmap/--mmap", "no_mmap", default=False,
            help="Read the weights into memory instead of mapping them (default: --mmap)."),
        opt(M, "--no-cuda-graphs", is_flag=True,
            help="Run every denoising step eagerly instead of replaying a CUDA graph "
            "(as DIFFCLI_CUDA_GRAPHS=0)."),
        opt(M, "-t", "--threads", type=int, default=None, metavar="N",
            help="CPU threads [default: torch's choice]; N <= 0 = every CPU (as llama.cpp)."),
        opt(M, "-c", "--ctx-size", type=int, default=0, show_default=True, metavar="N",
            help="Max total tokens (prompt + canvases); 0 = the model's context. With -n it is "
            "raised to n's canvases + 2048 as llama.cpp does (logged)."),
        # generation: prompt and length
        opt(G, "-p", "--prompt", metavar="PROMPT", help="Prompt text; '-' reads it from stdin "
            "(as does a piped stdin when -p is not given)."),
        opt(G, "-f", "--file", metavar="FILE", help="Read the prompt from FILE."),
        opt(G, "-e", "--escape/--no-escape", "escape", default=True,
            help="Turn \\n, \\t, \\r, \\', \\\", \\\\ and \\xHH in -p into the characters "
            "(default: on, as llama.cpp; -f and stdin are read as they are)."),
        opt(G, "-n", "--predict", "--n-predict", "n_predict", type=int, default=-1,
            show_default=True, metavar="N",
            help="Tokens to generate: ceil(N/canvas) canvases; -1 = --diffusion-blocks."),
        opt(G, "--diffusion-blocks", type=int, default=1, show_default=True, metavar="N",
            help="Canvases to generate when -n is not given."),
        opt(G, "--ignore-eos", is_flag=True,
            help="Do not stop at end-of-generation tokens: every canvas asked for is generated."),
        opt(G, "-s", "--seed", type=int, default=None, callback=_seed, metavar="SEED",
            help="RNG seed [default 4294967295 = 0xFFFFFFFF: deterministic, as llama.cpp; "
            "-1 means the same]."),
        opt(G, "--mmproj", "-mm", "mmproj", metavar="FILE",
            help="Vision tower (mmproj GGUF) for --image and /image."),
        opt(G, "--image", multiple=True, metavar="FILE",
            help="Image for the prompt (repeatable); placed at <__media__> markers in "
            "the prompt, else before the text."),
        opt(G, "--image-max-tokens", type=click.Choice(["70", "140", "280", "560", "1120"]),
            default="280", show_default=True, callback=lambda c, p, v: int(v),
            help="Soft tokens per image (the Gemma 4 processor's budgets)."),
        # entropy-bound sampler
        opt(S, "--diffusion-eb", type=AUTO_ON_OFF, default="auto", show_default=True,
            help="Entropy-bound decoder (auto = on for canvas models; off is not supported)."),
        opt(S, "--diffusion-eb-max-steps", type=int, metavar="N",
            help="Max denoising steps per canvas [GGUF key, else 48; 0 or -1 = that]."),
        opt(S, "--diffusion-eb-t-max", type=float, metavar="F",
            help="Temperature of the first step [GGUF key, else 0.8; -1 = that]."),
        opt(S, "--diffusion-eb-t-min", type=float, metavar="F",
            help="End point of the temperature schedule [GGUF key, else 0.4; -1 = that]."),
        opt(S, "--diffusion-eb-entropy-bound", type=float, metavar="F",
            help="Acceptance bound on summed entropy [GGUF key, else 0.1; -1 = that]."),
        opt(S, "--diffusion-eb-stability", type=int, metavar="N",
            help="Steps the argmax must stay unchanged to stop [GGUF key, else 1; -1 = that]."),
        opt(S, "--diffusion-eb-confidence", type=float, metavar="F",
            help="Mean-entropy stop threshold [GGUF key, else 0.005; -1 = that]."),
        opt(S, "--diffusion-kv-cache", type=AUTO_ON_OFF, default="auto", show_default=True,
            help="Encode the prefix once (on/auto) or re-run it every step (off, ~2x slower)."),
        # display and output
        opt(D, "--diffusion-visual", is_flag=True,
            help="Live canvas view (terminal only): accepted / renoised / settled positions, "
            "entropy shading, status line."),
        opt(D, "--diffusion-visual-progress", is_flag=True,
            help="Add a progress-bar line to the live view."),
        opt(D, "--diffusion-visual-interval", type=int, default=1, show_default=True,
            metavar="N", help="Redraw the live view every N-th step."),
        opt(D, "--json", "json", is_flag=True,
            help="Print one JSON object per reply (text, thinking, tokens, seed, stats)."),
        opt(D, "--trace", metavar="FILE.jsonl",
            help="Write every step (argmax canvas, accepted mask, entropies) as JSON lines."),
        opt(D, "--force", is_flag=True,
            help="Let --trace overwrite an existing file (never an input of the run)."),
        opt(D, "--no-perf/--perf", "no_perf", default=False,
            help="Leave out (or print, the default) the end-of-turn statistics."),
        opt(D, "-v", "--verbose", "--log-verbose", "verbose", is_flag=True,
            help="Tracebacks on errors."),
        opt(D, "-lv", "--verbosity", "--log-verbosity", "log_verbosity", type=int, metavar="N",
            help="llama.cpp's log threshold: 4 or more = -v; 2 or less = --log-disable; 3 = "
            "the default."),
        opt(D, "--log-disable", is_flag=True,
            help="Print no log lines or statistics on stderr (errors still are)."),
        opt(D, "--log-file", metavar="FILE",
            help="Also append every log line to FILE (never truncated)."),
        opt(D, "--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
            help="Print the version and exit."),
        # chat and thinking
        opt(C, "-cnv/-no-cnv", "--conversation/--no-conversation", "conversation", default=False,
            help="Chat mode: '> ' prompt, /help, /clear, /exit; -p is the first turn "
            "(default: one prompt, as llama-diffusion-cli)."),
        opt(C, "-sys", "--system-prompt", "system", metavar="PROMPT", help="System prompt."),
        opt(C, "-sysf", "--system-prompt-file", "system_file", metavar="FILE",
            help="Read the system prompt from FILE."),
        opt(C, "--think", is_flag=True, help="Enable thinking (off by default)."),
        opt(C, "--show-thinking", is_flag=True,
            help="Print the thought channel too (hidden by default)."),
        opt(C, "--chat-template-kwargs", metavar="JSON",
            help="""Extra template variables, e.g. '{"enable_thinking":true}'."""),
        opt(C, "--reasoning-budget", type=int, metavar="N",
            help="0 = thinking off (even with --think); -1 or N > 0 = thinking on (N is not "
            "enforced)."),
        opt(C, "--chat-template-file", metavar="FILE",
            help="Use this Jinja chat template instead of the GGUF's."),
        opt(C, "--no-chat-template", is_flag=True,
            help="Feed the prompt text as is (BOS + text), no chat template."),
        # accepted for compatibility
        compat("--diffusion-gpu-sampling", type=AUTO_ON_OFF, default="auto", show_default=True,
               help="Accepted; diffcli always keeps canvas logits on the device."),
        compat("--diffusion-gpu-sample-reduce", type=AUTO_ON_OFF, default="auto",
               show_default=True, help="Accepted; reductions always run on the device."),
        *[compat(flag, dest, default=None, metavar="V",
                 help=f"Legacy masked-diffusion flag (llama.cpp default {default}); "
                 "accepted, no effect on canvas models.")
          for flag, (dest, default) in LEGACY.items()],
        compat("--temp", "--temperature", "temp", type=float, metavar="F", help=f"Accepted; {no_eb}"),
        compat("--top-k", type=int, metavar="N", help=f"Accepted; {no_eb}"),
        compat("--top-p", type=float, metavar="F", help=f"Accepted; {no_eb}"),
        compat("--min-p", type=float, metavar="F", help=f"Accepted; {no_eb}"),
        compat("--repeat-penalty", type=float, metavar="F", help=f"Accepted; {no_eb}"),
        compat("-b", "--batch-size", type=int, default=2048, show_default=True, metavar="N",
               help="Accepted (llama.cpp sizing, logged); diffcli has no batch limit."),
        compat("-ub", "--ubatch-size", type=int, default=512, show_default=True, metavar="N",
               help="Accepted (llama.cpp sizing, logged); diffcli has no micro-batch limit."),
        compat("-tb", "--threads-batch", type=int, metavar="N"),
        compat("-fa", "--flash-attn", default="auto", metavar="on|off|auto"),
        compat("-ctk", "--cache-type-k", metavar="TYPE"),
        compat("-ctv", "--cache-type-v", metavar="TYPE"),
        compat("--mlock", is_flag=True),
        compat("--check-tensors", is_flag=True, help="Accepted; tensors are always checked."),
        compat("-fit", "--fit", type=Switch(), is_flag=False, flag_value="on", default="off",
               help="Accepted (llama.cpp's memory fitting); diffcli refuses a placement that "
               "does not fit and names one that does."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f
