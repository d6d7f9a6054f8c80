"""`diffcli run` end to end on a tiny random GGUF: flags, shell contract, exit codes, chat."""
from __future__ import annotations

import json
import re

import pytest
import torch

import diffcli
from diffcli.text.chat import ChatTemplate, Conversation, split_thinking
from diffcli.cli.run import run_cmd
from diffcli.generation.loop import CanvasEvent, Done, GenerationStats, StepEvent, generate
from diffcli.text.tokenizer import Tokenizer
from _cli_fixtures import FAST, make_model, run, trace_records, with_metadata

# Spec §C.8 (llama-diffusion-cli) plus the common flags and diffcli's additions named in the brief.
SPEC_FLAGS = """--diffusion-eb --diffusion-eb-max-steps --diffusion-eb-t-max --diffusion-eb-t-min
--diffusion-eb-entropy-bound --diffusion-eb-stability --diffusion-eb-confidence --diffusion-kv-cache
--diffusion-gpu-sampling --diffusion-gpu-sample-reduce --diffusion-blocks --diffusion-visual
--diffusion-visual-progress --diffusion-visual-interval --diffusion-steps --diffusion-eps
--diffusion-algorithm --diffusion-alg-temp --diffusion-block-length --diffusion-cfg-scale
--diffusion-add-gumbel-noise -m -p -f -sys -cnv -n -ngl -c -b -ub -t -tb -fa -ctk -ctv -ot
--n-cpu-moe --no-mmap --mlock --check-tensors -dev --seed -s --temp --top-k --top-p --no-perf --fit
--verbose --json --think --show-thinking --trace --device --chat-template-kwargs
--reasoning-budget""".split()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cli") / "tiny.gguf")


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer.from_gguf(model_path)


def _prompt_ids(tok, text, system=None, thinking=False):
    conv = Conversation(ChatTemplate(tok.chat_template), tok, system=system, enable_thinking=thinking)
    conv.add_user(text)
    return conv.prompt_ids()


def test_help_lists_every_flag():
    res = run(["--help"])
    assert res.exit_code == 0
    listed = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", res.stdout))
    assert set(SPEC_FLAGS) <= listed, sorted(set(SPEC_FLAGS) - listed)
    for param in run_cmd.params:                      # and every option the command has
        assert set(param.opts) <= listed, param.opts


def test_one_shot_matches_library(model_path, tok, tmp_path):
    res = run(["-m", model_path, "-p", "Why is the sky blue?", "-n", "32", "-s", "7", *FAST,
               "--json"])
    assert res.exit_code == 0, res.stderr
    # the load line names what multiplies on the CPU (compute.backend.cpu_kernels)
    assert re.search(r" on cpu \((float32|bfloat16), (torch|native \w+( \+ AMX| bf16)?) kernels\)", res.stderr)
    out = json.loads(res.stdout)                       # stdout is exactly one JSON object
    model = diffcli.load(model_path)
    ids = _prompt_ids(tok, "Why is the sky blue?")
    ref = generate(model, ids, max_new_tokens=32, seed=7, eog_ids=tok.eog_ids,
                           sampler=diffcli.SamplerConfig(max_steps=2))
    assert out["tokens"] == ref.tokens and out["seed"] == 7
    assert out["prompt_tokens"] == len(ids)
    thinking, answer = split_thinking(tok.decode(ref.tokens))
    assert out["text"] == answer and out["thinking"] == thinking
    assert out["stats"]["canvases"] == ref.stats.canvases
    # plain mode prints the same answer and nothing else on stdout
    plain = run(["-m", model_path, "-p", "Why is the sky blue?", "-n", "32", "-s", "7", *FAST])
    assert plain.stdout == out["text"] + ("" if out["text"].endswith("\n") else "\n")


def test_logs_and_stats_on_stderr(model_path):
    res = run(["-m", model_path, "-p", "hi", "--diffusion-eb-max-steps", "2", "-n", "20",
               "--device", "cpu", "--json"])
    assert res.exit_code == 0
    err, stats = res.stderr, json.loads(res.stdout)["stats"]
    assert "diffusion: -n 20 -> 2 blocks" in err and "(canvas_length=16)" in err
    assert re.search(r"diffusion_eb: max_steps=2 t=\[0\.40,0\.80\] entropy_bound=0\.1 stability=1 "
                     r"confidence=0\.005 kv_cache=on", err)
    blocks = stats["canvases"]                 # 2, or 1 if the first canvas hit an EOG/repetition cut
    m = re.search(r"total time: ([\d.]+)ms, time per step: ([\d.]+)ms \((\d+) steps over (\d+) "
                  r"blocks, entropy-bound\)", err)
    assert m and int(m.group(3)) == stats["steps"] == 2 * blocks and int(m.group(4)) == blocks
    # throughput counts the tokens the reply has, not whole canvases (test_cli_run checks the figures)
    assert re.search(rf"throughput: [\d.]+ tok/s \({stats['emitted_tokens']} tok in [\d.]+ms\), "
                     r"in-step parallel \d+ tok/s \(16-tok canvas x 2\.0 steps/block\)", err)
    assert re.search(r"diffcli: first canvas after \d+ms; prefill \d+ms \(\d+ tok\); stop: ", err)
    assert "\r" not in err                     # no progress line off a TTY


def test_same_seed_same_output_and_default_seed(model_path):
    a = run(["-m", model_path, "-p", "hello", *FAST, "--json"])
    b = run(["-m", model_path, "-p", "hello", *FAST, "--json", "-s", "-1"])
    c = run(["-m", model_path, "-p", "hello", *FAST, "--json", "-s", "1"])
    ja, jb, jc = (json.loads(r.stdout) for r in (a, b, c))
    assert ja["seed"] == jb["seed"] == 0xFFFFFFFF and ja["tokens"] == jb["tokens"]
    assert jc["tokens"] != ja["tokens"]


@pytest.mark.parametrize("how", ["pipe", "dash", "file"])
def test_prompt_sources(model_path, tmp_path, how):
    base = ["-m", model_path, *FAST, "--json"]
    ref = json.loads(run(base + ["-p", "Tell me"]).stdout)
    if how == "pipe":
        res = run(base, input="Tell me")
    elif how == "dash":
        res = run(base + ["-p", "-"], input="Tell me")
    else:
        (tmp_path / "p.txt").write_text("Tell me")
        res = run(base + ["-f", tmp_path / "p.txt"])
    assert json.loads(res.stdout)["tokens"] == ref["tokens"]


def test_sampler_precedence_cli_over_gguf_over_default(model_path, tmp_path):
    keyed = with_metadata(model_path, tmp_path / "keyed.gguf", **{"diffusion.eb_max_steps": 3,
                                                                   "diffusion.eb_confidence_threshold": 0.0})
    def steps(path, *extra):
        res = run(["-m", path, "-p", "x", "-n", "16", "--json", "--no-perf", "--device", "cpu", *extra])
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout)["stats"]["steps"], res.stderr
    n, err = steps(keyed)                                   # GGUF key beats the default 48
    assert n == 3 and "max_steps=3" in err and "confidence=0 " in err
    n, err = steps(keyed, "--diffusion-eb-max-steps", "5")  # CLI beats the GGUF key
    assert n == 5 and "max_steps=5" in err
    n, _ = steps(keyed, "--diffusion-eb-max-steps", "0")    # llama.cpp: 0 means "not given"
    assert n == 3
    _, err = steps(model_path, "--diffusion-eb-max-steps", "1")
    assert "t=[0.40,0.80] entropy_bound=0.1 stability=1 confidence=0.005" in err   # defaults


def test_trace_records_every_step(model_path, tmp_path):
    path = tmp_path / "t.jsonl"
    res = run(["-m", model_path, "-p", "x", "-n", "32", *FAST, "--json", "--trace", path])
    out = json.loads(res.stdout)
    recs = trace_records(path)
    steps = [r for r in recs if r["event"] == "step"]
    assert recs[0]["event"] == "prompt" and recs[-1]["event"] == "done"
    assert len(steps) == out["stats"]["steps"] == 4
    for r in steps:
        assert len(r["argmax"]) == len(r["accepted"]) == len(r["entropy"]) == 16
        assert sum(r["accepted"]) >= 1 and all(h >= 0 for h in r["entropy"])
    assert recs[-1]["tokens"] == out["tokens"]


def test_thinking_flags_reach_the_template(model_path, tok, tmp_path):
    think = tok.token_to_id("<|think|>")
    cases = {(): False, ("--think",): True, ("--chat-template-kwargs", '{"enable_thinking": true}'): True,
             ("--reasoning-budget", "-1"): True, ("--think", "--reasoning-budget", "0"): False}
    for flags, on in cases.items():
        path = tmp_path / "t.jsonl"
        res = run(["-m", model_path, "-p", "x", *FAST, "--trace", path, "--force", *flags])
        assert res.exit_code == 0, res.stderr
        ids = trace_records(path)[0]["ids"]
        assert (think in ids) == on, flags
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


def test_system_prompt_and_raw_mode(model_path, tok, tmp_path):
    path = tmp_path / "t.jsonl"
    run(["-m", model_path, "-p", "x", "-sys", "Be brief.", *FAST, "--trace", path])
    assert trace_records(path)[0]["ids"] == _prompt_ids(tok, "x", system="Be brief.")
    run(["-m", model_path, "-p", "plain text", "--no-chat-template", *FAST, "--trace", path, "--force"])
    assert trace_records(path)[0]["ids"] == tok.encode("plain text")


def _fake_stream(texts_tokens):
    """A stand-in for diffcli.stream that commits the given canvases (a model cannot be made to
    emit a thought channel on purpose)."""
    def fake(model, prompt_ids, **kw):
        C = len(texts_tokens[0])
        for i, toks in enumerate(texts_tokens):
            yield StepEvent(canvas=i, step=0, steps=1, argmax=torch.tensor(toks),
                            accepted=torch.ones(C, dtype=torch.bool),
                            renoised=torch.zeros(C, dtype=torch.bool), entropy=torch.zeros(C),
                            temperature=0.8, stable=False, elapsed_ms=1.0)
            last = i == len(texts_tokens) - 1
            yield CanvasEvent(canvas=i, tokens=list(toks), canvas_ids=list(toks), steps=1,
                              ended=last, reason="length" if last else None, elapsed_ms=1.0)
        stats = GenerationStats(seed=0, mode="cli", prompt_tokens=len(prompt_ids), canvases=1,
                                steps_per_canvas=[1], emitted_tokens=C, total_ms=1.0)
        yield Done(tokens=[t for c in texts_tokens for t in c], stats=stats)
    return fake


def test_thought_channel_hidden_unless_show_thinking(model_path, tok, monkeypatch):
    reply = tok.encode("<|channel>thought\nthe sky<channel|>blue", add_bos=False)
    half = len(reply) // 2       # the channel spans two canvases
    monkeypatch.setattr(diffcli, "stream", _fake_stream([reply[:half], reply[half:]]))
    res = run(["-m", model_path, "-p", "x", "--no-perf"])
    assert res.stdout == "blue\n"
    res = run(["-m", model_path, "-p", "x", "--no-perf", "--show-thinking"])
    assert res.stdout == "<|channel>thought\nthe sky<channel|>blue\n"
    res = run(["-m", model_path, "-p", "x", "--no-perf", "--json"])
    out = json.loads(res.stdout)
    assert out["text"] == "blue" and out["thinking"] == "the sky"


@pytest.mark.parametrize("args,needle", [
    (["-m", "{missing}", "-p", "x"], "no such file"),
    (["-m", "{notgguf}", "-p", "x"], "not a GGUF file"),
    (["-m", "{model}", "-p", "x", "--diffusion-eb-t-min", "2"], "t_min=2.0 is above t_max=0.8"),
    (["-m", "{model}", "-p", "x", "--diffusion-eb-max-steps", "x"], "not a valid integer"),
    (["-m", "{model}", "-p", "x", "--diffusion-kv-cache", "maybe"], "--diffusion-kv-cache"),
    (["-m", "{model}", "-p", "x", "--no-such-flag"], "no-such-flag"),
    (["-p", "x"], "-m"),
    (["-m", "{model}", "-p", "x", "--diffusion-eb", "off"], "legacy masked-diffusion"),
    (["-m", "{model}", "-p", "x", "--chat-template-kwargs", "{bad"], "not valid JSON"),
    (["-m", "{model}", "-p", "x", "-c", "20"], "does not fit the context of 20 tokens"),
    (["-m", "{model}", "-p", "   "], "prompt is empty"),
    (["-m", "{model}", "-p", "x", "-f", "{model}"], "both -p and -f"),
    (["-m", "{model}", "-p", "x", "--diffusion-blocks", "0"], "--diffusion-blocks"),
])
def test_bad_input_one_line_exit_2(model_path, tmp_path, args, needle):
    (tmp_path / "bad.gguf").write_bytes(b"this is not a gguf file at all")
    subst = {"{missing}": str(tmp_path / "nope.gguf"), "{notgguf}": str(tmp_path / "bad.gguf"),
             "{model}": str(model_path)}
    res = run(FAST + [subst.get(a, a) for a in args])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("diffcli: error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize("var,value", [("DIFFCLI_DTYPE", "f64"), ("DIFFCLI_BACKEND", "cuda-fast"),
                                       ("DIFFCLI_CUDA_GRAPHS", "maybe"), ("DIFFCLI_NATIVE_INT8", "fast")])
def test_bad_environment_one_line_exit_2(model_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)      # backend_for reads the environment on every call
    res = run(["-m", model_path, "-p", "x", *FAST])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("diffcli: error:")]
    assert len(errors) == 1 and f"{var}={value!r}" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_runtime_error_exit_1_and_verbose_traceback(model_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded")
        yield
    monkeypatch.setattr(diffcli, "stream", boom)
    res = run(["-m", model_path, "-p", "x", *FAST])
    assert res.exit_code == 1 and "kernel exploded" in res.stderr and "Traceback" not in res.stderr
    res = run(["-m", model_path, "-p", "x", *FAST, "--verbose"])
    assert res.exit_code == 1 and "Traceback" in res.stderr


def test_accepted_flags_are_logged_not_fatal(model_path):
    res = run(["-m", model_path, "-p", "x", *FAST, "--temp", "0.3", "--top-k", "5", "--top-p", "0.9",
               "--diffusion-steps", "64", "--diffusion-algorithm", "1", "-ngl", "99", "--n-cpu-moe", "2",
               "-ot", "exps=CPU", "--no-mmap", "-t", "2", "-tb", "2", "-fa", "on", "-b", "64", "-ub", "64",
               "--mlock", "--check-tensors", "--fit", "--diffusion-gpu-sampling", "on",
               "--diffusion-gpu-sample-reduce", "off", "-ctk", "q8_0", "-ctv", "q8_0", "--device", "cpu",
               "-dev", "cpu", "--diffusion-eb", "on"])
    assert res.exit_code == 0, res.stderr
    err = res.stderr
    assert "--temp 0.3 is ignored" in err and "--diffusion-steps only applies" in err
    assert "n-cpu-moe=2" in err or "n_cpu_moe" not in err


def test_no_cuda_graphs_switches_the_model_off(model_path, monkeypatch):
    seen = []
    real = diffcli.stream

    def spy(model, *a, **k):
        seen.append(model.cuda_graphs)
        return real(model, *a, **k)
    monkeypatch.setattr(diffcli, "stream", spy)
    on = run(["-m", model_path, "-p", "x", *FAST, "--json"])
    off = run(["-m", model_path, "-p", "x", *FAST, "--json", "--no-cuda-graphs"])
    assert on.exit_code == off.exit_code == 0, off.stderr
    assert seen == [True, False]
    assert json.loads(on.stdout)["tokens"] == json.loads(off.stdout)["tokens"]


def test_kv_cache_off_gives_the_same_canvas(model_path):
    on = json.loads(run(["-m", model_path, "-p", "x", *FAST, "--json"]).stdout)
    off = json.loads(run(["-m", model_path, "-p", "x", *FAST, "--json", "--diffusion-kv-cache", "off"]).stdout)
    assert on["tokens"] == off["tokens"]


def test_cuda_device_without_cuda(model_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = run(["-m", model_path, "-p", "x", *FAST, "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA device" in res.stderr


def test_visual_turns_itself_off_when_piped(model_path):
    res = run(["-m", model_path, "-p", "x", *FAST, "--diffusion-visual", "-s", "3"])
    ref = run(["-m", model_path, "-p", "x", *FAST, "-s", "3"])
    assert res.exit_code == 0 and res.stdout == ref.stdout and "\x1b" not in res.stdout
    assert "live view off" in res.stderr


# ---- chat mode (-cnv) --------------------------------------------------------------------------

def _count_encoder_tokens(monkeypatch) -> list[int]:
    """Wrap the model's commit (the encoder pass; encode() goes through it too) to count tokens."""
    from diffcli.model.diffusion_gemma import DiffusionGemma
    counts: list[int] = []
    original = DiffusionGemma.commit

    def counting(self, cache, block_ids):
        counts.append(int(len(block_ids)))
        return original(self, cache, block_ids)
    monkeypatch.setattr(DiffusionGemma, "commit", counting)
    return counts


def test_chat_multi_turn_reuses_the_prompt_cache(model_path, tok, tmp_path, monkeypatch):
    counts = _count_encoder_tokens(monkeypatch)
    trace = tmp_path / "chat.jsonl"
    # float32: the reused cache was encoded in other chunks than a fresh prompt's, which only
    # float32 reproduces to the last bit that an argmax near a tie may need
    res = run(["-m", model_path, "-cnv", *FAST, "-n", "16", "-sys", "Be brief.", "--json",
               "--trace", trace, "--dtype", "f32"], input="Why is the sky blue?\n\nAnd sunsets?\n")
    assert res.exit_code == 0, res.stderr
    replies = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(replies) == 2                                   # empty line ignored
    assert not any(ln.startswith("> ") for ln in res.stderr.splitlines())  # stdin is no terminal
    prompts = [r["ids"] for r in trace_records(trace) if r["event"] == "prompt"]
    # turn 2's prompt is the template over the whole history, the first reply included
    conv = Conversation(ChatTemplate(tok.chat_template), tok, system="Be brief.")
    conv.add_user("Why is the sky blue?")
    assert prompts[0] == conv.prompt_ids()
    conv.add_reply(replies[0]["text"].strip())
    conv.add_user("And sunsets?")
    assert prompts[1] == conv.prompt_ids()
    # one canvas per reply, never committed: the encoder saw turn 1's prompt once, then only the
    # tail of turn 2 from the last <|turn> of turn 1 (the generation prompt) on
    turn = tok.token_to_id("<|turn>")
    checkpoint = len(prompts[0]) - 1 - prompts[0][::-1].index(turn)
    assert sum(counts) == len(prompts[0]) + len(prompts[1]) - checkpoint
    # and the reply equals a fresh one-shot generation on the same prompt ids
    ref = generate(diffcli.load(model_path, dtype=torch.float32), prompts[1], max_new_tokens=16,
                   seed=0xFFFFFFFF, eog_ids=tok.eog_ids, sampler=diffcli.SamplerConfig(max_steps=2))
    assert replies[1]["tokens"] == ref.tokens


def test_chat_commands_and_eof(model_path, tok, tmp_path):
    trace = tmp_path / "chat.jsonl"
    script = "first\n/help\n/claer\n/clear\nsecond\n/exit\nnever sent\n"
    res = run(["-m", model_path, "-cnv", *FAST, "-sys", "SYS", "--trace", trace, "-p", "zeroth"],
              input=script)
    assert res.exit_code == 0, res.stderr
    prompts = [tok.decode(r["ids"], special=True) for r in trace_records(trace) if r["event"] == "prompt"]
    assert len(prompts) == 3                      # -p turn, "first", "second"; /exit stops
    assert "zeroth" in prompts[0] and "first" in prompts[1] and "zeroth" in prompts[1]
    assert "second" in prompts[2] and "first" not in prompts[2] and "SYS" in prompts[2]  # /clear
    assert "/clear" in res.stderr and "/help" not in res.stdout
    assert "unknown command /claer" in res.stderr and "claer" not in "".join(prompts)
    assert len(res.stdout.splitlines()) >= 3 and "never sent" not in "".join(prompts)
    eof = run(["-m", model_path, "-cnv", *FAST], input="only line\n")   # EOF ends the session
    assert eof.exit_code == 0 and eof.stdout.endswith("\n")


def test_chat_ctrl_c_stops_the_reply_and_continues(model_path, tok, monkeypatch):
    real = diffcli.stream
    calls = []

    def sometimes_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield from real(*a, **k)
    monkeypatch.setattr(diffcli, "stream", sometimes_interrupted)
    res = run(["-m", model_path, "-cnv", *FAST, "--json"], input="one\ntwo\n")
    assert res.exit_code == 0 and "reply stopped" in res.stderr
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("{")]) == 1


def test_make_tiny_model_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_model.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "t.gguf"), "--layers", "2"],
                         capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path == str(tmp_path / "t.gguf")
    res = run(["-m", path, "-p", "hi", *FAST, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["stats"]["canvases"] == 1


@pytest.mark.gpu
def test_cli_on_cuda_matches_library(model_path, tok):
    args = ["-m", model_path, "-p", "Why?", "-n", "32", "-s", "5", "--diffusion-eb-max-steps", "3",
            "--no-perf", "--json"]
    res = run(args + ["--device", "cuda"])
    assert res.exit_code == 0, res.stderr
    assert " on cuda" in res.stderr and "gpu_sampling=on" in res.stderr
    ref = generate(diffcli.load(model_path, device="cuda"), _prompt_ids(tok, "Why?"),
                   max_new_tokens=32, seed=5, eog_ids=tok.eog_ids,
                   sampler=diffcli.SamplerConfig(max_steps=3))
    assert json.loads(res.stdout)["tokens"] == ref.tokens
    auto = run(args)                                     # auto picks the GPU
    assert " on cuda" in auto.stderr
    cpu = run(args + ["-ngl", "0"])                      # llama.cpp: -ngl 0 = CPU only
    assert " on cpu" in cpu.stderr


def test_diffusion_blocks_without_n(model_path):
    res = run(["-m", model_path, "-p", "x", *FAST, "--json", "--diffusion-blocks", "3",
               "--diffusion-eb-stability", "0", "--diffusion-eb-confidence", "100"])
    stats = json.loads(res.stdout)["stats"]
    assert "diffusion: -n -1 -> 3 blocks" in res.stderr
    assert stats["steps_per_canvas"] == [1] * stats["canvases"]      # stops after one step
    assert stats["canvases"] == 3 or stats["stop_reason"] in ("eog", "repetition")
