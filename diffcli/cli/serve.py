"""`diffcli serve`: the OpenAI-compatible server, with every model, sampler and placement flag of
`diffcli run` (the same option definitions, so the two never drift apart) plus llama-server's
`--host`, `--port`, `--api-key` and `-a/--alias`.

Flags of `run` that only make sense for one prompt in a terminal (-p, -f, -cnv, the live view,
--json, --trace, --show-thinking) are left out. The GGUF's metadata, tokenizer and template are
read before the socket is bound, so a bad file fails at once with exit 2; the weights load after,
while /health answers 503.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import RuntimeFailure
from .flags import FlagCommand
from .options import RunOptions
from .run_flags import click_options
from .session import log

# run's flags that serve does not take (one prompt, terminal output)
NOT_SERVED = {"prompt", "file", "system", "system_file", "escape", "conversation",
              "diffusion_visual", "diffusion_visual_progress", "diffusion_visual_interval",
              "show_thinking", "json", "trace", "ignore_eos", "image",
              "force"}
SERVE_ONLY = ("host", "port", "api_key", "alias", "max_queue")


def _run_params() -> list[click.Parameter]:
    def holder(**kwargs):   # collects run's click options without defining a command
        pass
    return [p for p in reversed(click_options(holder).__click_params__) if p.name not in NOT_SERVED]


@click.command("serve", cls=FlagCommand, default_group="server",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface: set --api-key too).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port (0 picks a free one; the log line says which).")
@click.option("--api-key", envvar="DIFFCLI_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics [env DIFFCLI_API_KEY].")
@click.option("-a", "--alias", metavar="NAME",
              help="Model name in /v1/models and in responses [default: the file name].")
@click.option("--max-queue", type=click.IntRange(0), default=16, show_default=True, metavar="N",
              help="Requests that may wait behind the one being generated; more get 503 with "
              "Retry-After.")
@click.pass_context
def serve_cmd(ctx: click.Context, **kwargs) -> None:
    """Serve a DiffusionGemma GGUF over vLLM's OpenAI API, with a live canvas page at /.

    \b
    Examples:
      diffcli serve -m model.gguf                       # http://127.0.0.1:8080/v1
      diffcli serve -m model.gguf --port 9000 --api-key secret
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 256}'

    Requests without max_tokens get -n tokens (when given), else --diffusion-blocks canvases
    (when given), else whatever fits the context. Requests without a seed get -s (when given),
    else a fresh one, reported in the reply's "diffusion" stats.
    """
    from ..engine.loading import load_model, open_model_file, resolve_device
    from ..generation.prefix import PrefixCachedModel
    try:
        from ..serve.runner import Settings
        from ..serve.server import serve
    except ImportError as exc:
        raise RuntimeFailure(f"diffcli serve needs the serve extra ({exc.name} is missing)",
                             fix="run scripts/setup.sh, or pip install 'diffcli[serve]'") from None

    given = {name for name in kwargs
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    server_args = {k: kwargs.pop(k) for k in SERVE_ONLY}
    opts = RunOptions.from_click(kwargs)
    opts.validate()
    mf = open_model_file(opts.model, sampler_overrides=opts.sampler_overrides(),
                         template_source=opts.chat_template_source(None),
                         template_path=opts.chat_template_file)
    C = mf.canvas_length
    context = opts.ctx_size if opts.ctx_size > 0 else int(mf.config.context_length)
    if opts.n_predict > 0:
        default_max = opts.n_predict
    elif "diffusion_blocks" in given:
        default_max = opts.diffusion_blocks * C
    else:
        default_max = None
    template_kwargs = opts.template_kwargs()
    settings = Settings(
        model_name=server_args["alias"] or Path(opts.model).name, context=context,
        default_max_tokens=default_max, default_seed=opts.seed if "seed" in given else None,
        thinking=bool(template_kwargs.pop("enable_thinking", opts.thinking_enabled())),
        template_kwargs=template_kwargs, use_template=not opts.no_chat_template,
        kv_cache=opts.diffusion_kv_cache != "off", max_queue=server_args["max_queue"],
        api_key=server_args["api_key"] or None, log_requests=not opts.no_perf,
        mmproj=opts.mmproj, image_max_tokens=opts.image_max_tokens)
    if opts.mmproj is not None:     # checked against the model before the server listens
        from ..engine.images import vision_config
        settings.vision = vision_config(opts.mmproj, mf.config, mf.tokenizer)
    device = resolve_device("cpu" if opts.n_gpu_layers == 0 and opts.device == "auto" else opts.device)
    for note in opts.ignored_notes():
        log(note)
    s = mf.sampler
    reply = f"{default_max} tokens" if default_max else "up to the context"
    log(f"diffcli serve: {opts.model}: canvas {C}, context {context}, default reply {reply}; "
        f"diffusion_eb: "
        f"max_steps={s.max_steps} t=[{s.t_min:.2f},{s.t_max:.2f}] entropy_bound={s.entropy_bound:g} "
        f"stability={s.stability} confidence={s.confidence:g}; thinking "
        f"{'on' if settings.thinking else 'off'} by default; images "
        f"{'on (--mmproj)' if settings.vision is not None else 'off (no --mmproj)'}")

    def load():
        model = load_model(opts.model, device, dtype=opts.dtype, n_gpu_layers=opts.n_gpu_layers,
                           n_cpu_moe=opts.n_cpu_moe, override_tensor=tuple(opts.override_tensor),
                           mmap=not opts.no_mmap, threads=opts.threads,
                           cuda_graphs=not opts.no_cuda_graphs, log=log)
        log(f"diffcli serve: loaded {opts.model} on {device} "
            f"({str(model.dtype).removeprefix('torch.')})")
        if settings.kv_cache:       # consecutive turns of a chat re-encode only their new tokens
            model = PrefixCachedModel(model, checkpoint_id=mf.tokenizer.token_to_id("<|turn>"))
        return model

    serve(mf, settings, host=server_args["host"], port=server_args["port"], load=load, log=log)


serve_cmd.params.extend(_run_params())
