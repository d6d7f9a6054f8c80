"""llama-diffusion-cli command lines paste unchanged (issue 13, items 12-16): llama.cpp's option
forms and aliases, whole-word single-dash options, -hf from a local hub mirror, device strings,
values llama.cpp gives a meaning to (followed and logged) or not (refused), the grouped help and
the lazy imports behind a fast --help."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import diffcli
from diffcli.cli import options as options_mod
from diffcli.cli.options import CPU_MOE_RULE, RunOptions
from diffcli.cli.text_input import process_escapes
from diffcli.cli.run import run_cmd
from diffcli.errors import InputError
from diffcli.model import placement
from _cli_fixtures import FAST, make_model, run, trace_records

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("flags") / "tiny.gguf")


def parse(args: list[str]) -> RunOptions:
    """The RunOptions a command line parses into (no model is opened)."""
    ctx = run_cmd.make_context("run", [str(a) for a in args])
    return RunOptions.from_click(ctx.params)


def one_error(res) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("diffcli: error:")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return errors[0]


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ---- item 12: llama.cpp's flags and forms --------------------------------------------------

def test_single_dash_multi_letter_options_are_whole_words(tmp_path):
    sysf = tmp_path / "sys.txt"
    sysf.write_text("Be brief.\n")
    o = parse(["-m", "x.gguf", "-sysf", sysf, "-no-cnv", "-cmoe", "-ncmoe", "3", "-p", "hi"])
    # Click alone read these as -s ysf (a bad seed), -n o-cnv and -c moe
    assert o.system_file == str(sysf) and o.conversation is False and o.cpu_moe is True
    assert o.n_cpu_moe == 3 and o.seed == 0xFFFFFFFF and o.n_predict == -1 and o.ctx_size == 0
    assert parse(["-m", "x", "-cnv", "-no-cnv"]).conversation is False
    assert parse(["-m", "x", "-no-cnv", "-cnv"]).conversation is True
    assert parse(["-m", "x", "-hf", "u/r:Q8_0"]).hf_repo == "u/r:Q8_0"


@pytest.mark.parametrize("args,value", [
    (["--predict", "32"], ("n_predict", 32)), (["--n-predict", "32"], ("n_predict", 32)),
    (["-ngl", "all"], ("n_gpu_layers", -1)), (["-ngl", "auto"], ("n_gpu_layers", -1)),
    (["-ngl", "AUTO"], ("n_gpu_layers", -1)), (["-ngl", "7"], ("n_gpu_layers", 7)),
    (["-fit", "off"], ("fit", "off")), (["-fit", "on"], ("fit", "on")),
    (["--fit", "enabled"], ("fit", "on")), (["--fit"], ("fit", "on")), ([], ("fit", "off")),
    (["-v"], ("verbose", True)), (["--log-verbose"], ("verbose", True)),
    (["--verbose"], ("verbose", True)), (["-lv", "4"], ("log_verbosity", 4)),
    (["--perf"], ("no_perf", False)), (["--no-perf"], ("no_perf", True)),
    (["--no-mmap", "--mmap"], ("no_mmap", False)), (["--no-mmap"], ("no_mmap", True)),
    (["--no-escape"], ("escape", False)), (["--no-escape", "-e"], ("escape", True)),
    (["--escape"], ("escape", True)), (["--ignore-eos"], ("ignore_eos", True)),
    (["--temperature", "0.3"], ("temp", 0.3)), (["--min-p", "0.05"], ("min_p", 0.05)),
    (["--repeat-penalty", "1.1"], ("repeat_penalty", 1.1)), (["--log-disable"], ("log_disable", True)),
    (["--log-file", "l.txt"], ("log_file", "l.txt")), (["-dev", "CUDA0,CUDA1"], ("device", "CUDA0,CUDA1")),
    (["--cpu-moe"], ("cpu_moe", True)), (["-mm", "p.gguf"], ("mmproj", "p.gguf")),
])
def test_llama_cpp_forms_parse(args, value):
    o = parse(["-m", "x.gguf", *args])
    name, want = value
    got = getattr(o, name) if hasattr(o, name) else o.extra[name]
    assert got == want


@pytest.mark.parametrize("arg,needle", [
    ("-sysff", "unknown option -sysff (did you mean -sysf?)"), ("-cmo", "unknown option -cmo"),
    ("-n5", "unknown option -n5"), ("-hfx", "unknown option -hfx"), ("--no-such-flag", "no-such-flag"),
])
def test_an_argument_that_is_no_option_is_one_line(model_path, arg, needle):
    res = run(["-m", model_path, "-p", "x", arg])
    assert res.exit_code == 2
    assert needle in one_error(res)


def test_bad_forms_are_one_line(model_path):
    for args, needle in [(["-ngl", "most"], "'most' is not a number of layers, all or auto"),
                         (["-fit", "maybe"], "'maybe' is not on or off")]:
        res = run(["-m", model_path, "-p", "x", *args])
        assert res.exit_code == 2 and needle in one_error(res)


@pytest.mark.parametrize("args", [["--version"], ["run", "--version"], ["-m", "x.gguf", "--version"],
                                  ["-m", "x.gguf", "-p", "hi", "--version"]])
def test_version_anywhere(args):
    res = run(args)
    assert res.exit_code == 0 and res.stdout == f"diffcli {diffcli.__version__}\n"


def test_list_devices(monkeypatch):
    no_cuda(monkeypatch)
    monkeypatch.setattr(placement, "mps_available", lambda: False)
    res = run(["--list-devices"])           # needs no -m, as in llama.cpp
    assert res.exit_code == 0
    assert res.stdout == "Available devices:\n  (none: diffcli runs on the CPU)\n"
    if torch.cuda.is_available():
        monkeypatch.undo()
        res = run(["--list-devices"])
        assert "  CUDA0: " in res.stdout and " MiB free)" in res.stdout


def test_escapes_follow_llama_cpp():
    # llama.cpp's string_process_escapes: these six, and \xHH as one byte; others stay as typed
    assert process_escapes(r"a\nb\tc\rd\'e\"f\\g") == "a\nb\tc\rd'e\"f\\g"
    assert process_escapes(r"\x41\x62") == "Ab"
    assert process_escapes(r"caf\xc3\xa9") == "café"          # bytes, so UTF-8 sequences work
    assert process_escapes(r"\q \xZZ \x4 end\\") == r"\q \xZZ \x4 end" + "\\"
    assert process_escapes("trailing\\") == "trailing\\"
    assert process_escapes("é ✓") == "é ✓"
    with pytest.raises(InputError, match="not UTF-8"):
        process_escapes(r"\xff")


def test_escape_reaches_the_prompt(model_path, tmp_path):
    from diffcli.text.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(model_path)
    ids = {}
    for flags in ([], ["--no-escape"]):
        trace = tmp_path / f"t{len(flags)}.jsonl"
        res = run(["-m", model_path, "-p", r"one\ntwo", "--no-chat-template", *FAST,
                   "--trace", trace, *flags])
        assert res.exit_code == 0, res.stderr
        ids[bool(flags)] = trace_records(trace)[0]["ids"]
    assert ids[False] == tok.encode("one\ntwo")
    assert ids[True] == tok.encode("one\\ntwo")


def test_system_prompt_file(model_path, tmp_path):
    (tmp_path / "s.txt").write_text("Be brief.\n")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run(["-m", model_path, "-p", "x", "-sysf", tmp_path / "s.txt", *FAST, "--trace", a])
    run(["-m", model_path, "-p", "x", "-sys", "Be brief.", *FAST, "--trace", b])
    assert trace_records(a)[0]["ids"] == trace_records(b)[0]["ids"]   # one newline dropped
    res = run(["-m", model_path, "-p", "x", "-sysf", tmp_path / "nope.txt", *FAST])
    assert res.exit_code == 2 and "nope.txt: no such file" in one_error(res)
    res = run(["-m", model_path, "-p", "x", "-sysf", tmp_path / "s.txt", "-sys", "y", *FAST])
    assert res.exit_code == 2 and "both -sys and -sysf" in one_error(res)


def test_ignore_eos_passes_no_stop_ids(model_path, monkeypatch):
    seen = []
    real = diffcli.stream

    def spy(model, ids, **kw):
        seen.append(kw["eog_ids"])
        return real(model, ids, **kw)
    monkeypatch.setattr(diffcli, "stream", spy)
    assert run(["-m", model_path, "-p", "x", *FAST]).exit_code == 0
    assert run(["-m", model_path, "-p", "x", *FAST, "--ignore-eos"]).exit_code == 0
    assert len(seen[0]) > 0 and tuple(seen[1]) == ()


def test_cpu_moe_puts_every_expert_on_the_cpu():
    o = parse(["-m", "x.gguf", "-cmoe", "-ot", "attn_q=CPU"])
    o._place()
    assert o.override_tensor == ("attn_q=CPU", CPU_MOE_RULE)   # after the user's own rules
    names = [f"blk.{i}.{t}" for i in range(3) for t in
             ("ffn_gate_up_exps.weight", "ffn_down_exps.weight", "attn_q.weight", "ffn_down.weight")]
    plan = placement.plan_placement(names, 3, "cuda:0", override_tensor=o.override_tensor)
    cpu = torch.device("cpu")
    for name, dev in plan.tensors.items():
        assert (dev == cpu) == ("_exps" in name or "attn_q" in name), name


def test_log_disable_and_log_file(model_path, tmp_path):
    quiet = run(["-m", model_path, "-p", "x", *FAST, "--perf", "--log-disable"])
    assert quiet.exit_code == 0 and quiet.stdout.strip()
    assert quiet.stderr == ""
    log = tmp_path / "run.log"
    log.write_text("earlier run\n")
    res = run(["-m", model_path, "-p", "x", *FAST, "--perf", "--log-file", log])
    assert res.exit_code == 0
    text = log.read_text()
    assert text.startswith("earlier run\n")                    # appended, never truncated
    for line in res.stderr.splitlines():                        # every log line is in the file
        assert line in text.splitlines()
    assert "total time:" in text and "\r" not in text
    lv = run(["-m", model_path, "-p", "x", *FAST, "--perf", "-lv", "2"])
    assert lv.exit_code == 0 and lv.stderr == ""
    err = run(["-m", model_path, "-p", "x", *FAST, "--log-disable", "-n", "0"])
    assert err.exit_code == 2 and "-n/--predict" in one_error(err)   # errors still show


def test_log_file_never_names_an_input(model_path, tmp_path):
    before = Path(model_path).read_bytes()
    res = run(["-m", model_path, "-p", "x", *FAST, "--log-file", model_path])
    assert res.exit_code == 2 and "--log-file names" in one_error(res)
    assert Path(model_path).read_bytes() == before


def test_verbose_spellings_agree(model_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded")
        yield
    monkeypatch.setattr(diffcli, "stream", boom)
    plain = run(["-m", model_path, "-p", "x", *FAST])
    assert plain.exit_code == 1 and "rerun with --verbose" in plain.stderr
    for flag in (["-v"], ["--verbose"], ["--log-verbose"], ["-lv", "4"]):
        res = run(["-m", model_path, "-p", "x", *FAST, *flag])
        assert res.exit_code == 1 and "Traceback" in res.stderr, flag
        assert "rerun with --verbose" not in res.stderr and "kernel exploded" in res.stderr


# ---- item 13: -hf from a local hub mirror --------------------------------------------------

class FakeHub:
    """A Hugging Face hub double on 127.0.0.1: the tree listing and resolve endpoints that
    huggingface_hub's list_repo_tree and hf_hub_download use, for the repos given."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos, self.downloads = repos, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _file(self, head: bool):
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "tree":
                    repo = hub.repos.get("/".join(parts[2:4]))
                    if repo is None:
                        return self._missing("RepoNotFound")
                    body = json.dumps([{"type": "file", "oid": hashlib.sha1(d).hexdigest(),
                                        "size": len(d), "path": p} for p, d in repo.items()]).encode()
                    return self._send(body, {"Content-Type": "application/json"}, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.repos.get("/".join(parts[:2]))
                    if repo is None:
                        return self._missing("RepoNotFound")
                    name = "/".join(parts[4:])
                    if name not in repo:
                        return self._missing("EntryNotFound")
                    data = repo[name]
                    if not head:
                        hub.downloads.append(name)
                    return self._send(data, {"X-Repo-Commit": "c" * 40,
                                             "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, head)
                return self._missing("RepoNotFound")

            def _send(self, body, headers, head):
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _missing(self, code):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self._file(head=False)

            def do_HEAD(self):
                self._file(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(model_path, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    tiny = Path(model_path).read_bytes()
    other = make_model(tmp_path / "other.gguf", hidden_size=96).read_bytes()
    fake = FakeHub({"user/tiny-GGUF": {"tiny-Q8_0.gguf": other, "tiny-Q4_K_M.gguf": tiny,
                                      "mmproj-tiny-F16.gguf": b"not used", "README.md": b"hi"},
                    "user/noq4": {"b-Q8_0.gguf": other, "a-BF16.gguf": tiny}})
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.close()


def test_hf_downloads_the_quant_and_runs(model_path, hub, tmp_path):
    res = run(["-hf", "user/tiny-GGUF", "-p", "x", *FAST, "--json", "-s", "3"])
    assert res.exit_code == 0, res.stderr
    assert hub.downloads == ["tiny-Q4_K_M.gguf"]               # the default quant, only it
    ref = run(["-m", model_path, "-p", "x", *FAST, "--json", "-s", "3"])
    assert json.loads(res.stdout)["tokens"] == json.loads(ref.stdout)["tokens"]
    cached = list((tmp_path / "hub-cache").rglob("tiny-Q4_K_M.gguf"))
    assert cached and cached[0].read_bytes() == Path(model_path).read_bytes()
    assert "tiny-Q4_K_M.gguf" in res.stderr and hub.url in res.stderr
    # a second run finds it in the cache; --offline then needs no server at all
    again = run(["-hf", "user/tiny-GGUF:q4_k_m", "-p", "x", *FAST, "--json", "-s", "3"])
    assert again.exit_code == 0 and hub.downloads == ["tiny-Q4_K_M.gguf"]
    hub.close()
    off = run(["-hf", "user/tiny-GGUF", "--offline", "-p", "x", *FAST, "--json", "-s", "3"])
    assert off.exit_code == 0, off.stderr
    assert json.loads(off.stdout)["tokens"] == json.loads(ref.stdout)["tokens"]
    res = run(["-hf", "user/tiny-GGUF:Q8_0", "--offline", "-p", "x", *FAST])
    assert res.exit_code == 2 and "not in the Hugging Face cache" in one_error(res)


def test_hf_quant_tags_and_errors(hub):
    res = run(["-hf", "user/tiny-GGUF:q8_0", "-p", "x", *FAST, "--json"])
    assert res.exit_code == 0 and hub.downloads == ["tiny-Q8_0.gguf"]   # case-insensitive
    res = run(["-hf", "user/noq4", "-p", "x", *FAST, "--json"])          # no Q4_K_M: the first
    assert res.exit_code == 0 and hub.downloads[-1] == "a-BF16.gguf"
    res = run(["-hf", "user/tiny-GGUF:Q2_K", "-p", "x", *FAST])
    assert res.exit_code == 2
    assert "no GGUF of that quant" in one_error(res) and "Q4_K_M, Q8_0" in one_error(res)
    res = run(["-hf", "user/missing", "-p", "x", *FAST])
    assert res.exit_code == 2 and "no such repository" in one_error(res)
    res = run(["-hf", "x/y", "-p", "x"])          # once printed the help with exit 0
    assert res.exit_code == 2 and "Usage" not in res.stdout
    res = run(["-hf", "not a repo", "-p", "x"])
    assert res.exit_code == 2 and "is not USER/REPO[:QUANT]" in one_error(res)
    res = run(["-hf", "user/tiny-GGUF", "-m", "x.gguf", "-p", "x"])
    assert res.exit_code == 2 and "both -m and -hf" in one_error(res)
    res = run(["-hf", "user/noq4", "--image", "a.png", "-p", "x", *FAST])
    assert res.exit_code == 2 and "-hf user/noq4 has no mmproj file" in one_error(res)


def test_hf_image_brings_the_mmproj(hub, tmp_path, monkeypatch):
    from diffcli.cli import hub as hub_mod
    got = hub_mod.resolve("user/tiny-GGUF", mmproj=True, log=lambda m: None)
    assert Path(got.mmproj).read_bytes() == b"not used"
    assert hub.downloads == ["tiny-Q4_K_M.gguf", "mmproj-tiny-F16.gguf"]


def test_hf_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)      # import fails
    res = run(["-hf", "user/tiny-GGUF", "-p", "x"])
    assert res.exit_code == 1
    assert "-hf needs the huggingface_hub package" in one_error(res)


def test_pick_model_follows_llama_cpp():
    from diffcli.cli.hub import pick_model, pick_mmproj
    files = ["README.md", "x-UD-Q4_K_XL.gguf", "x-Q4_K_M.gguf", "x-Q4_K_S.gguf", "mmproj-BF16.gguf",
             "mmproj-F16.gguf", "sub/x-IQ4_XS.gguf"]
    assert pick_model(files, None, "r") == "x-Q4_K_M.gguf"
    assert pick_model(files, "q4_k_s", "r") == "x-Q4_K_S.gguf"
    assert pick_model(files, "IQ4_XS", "r") == "sub/x-IQ4_XS.gguf"
    assert pick_model(files, "Q4_K_XL", "r") == "x-UD-Q4_K_XL.gguf"
    assert pick_model(["b.gguf", "a.gguf", "mmproj.gguf"], None, "r") == "a.gguf"
    assert pick_mmproj(files, None) == "mmproj-F16.gguf" and pick_mmproj(files, "bf16") == "mmproj-BF16.gguf"
    with pytest.raises(InputError, match="split in 3 parts"):
        pick_model(["x-Q8_0-00001-of-00003.gguf", "x-Q8_0-00002-of-00003.gguf"], "Q8_0", "r")
    with pytest.raises(InputError, match="no GGUF file"):
        pick_model(["README.md"], None, "r")


# ---- item 14: device strings ---------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["-dev", "bogus"], "-dev: unknown device 'bogus'"),
    (["-dev", "CUDA0,CUDA1"], "-dev CUDA0: no CUDA device is available"),
    (["--device", "cuda"], "no CUDA device"),
    (["-ot", "ffn=CUDA0"], "-ot ffn=CUDA0: no CUDA device is available"),
    (["-ot", "ffn=TPU0"], "-ot: unknown device 'TPU0'"),
    (["-dev", "CUDA0,none"], "auto and none stand alone"),
])
def test_device_strings_are_one_line(model_path, monkeypatch, args, needle):
    no_cuda(monkeypatch)
    res = run(["-m", model_path, "-p", "x", "--diffusion-eb-max-steps", "2", "--no-perf", *args])
    assert res.exit_code == 2
    assert needle in one_error(res)


def test_device_lists(monkeypatch):
    monkeypatch.setattr(placement, "cuda_count", lambda: 2)
    assert placement.parse_device_list("CUDA1") == ("cuda:1", None)
    assert placement.parse_device_list("cuda") == ("cuda", None)
    name, note = placement.parse_device_list("CUDA1,CUDA0")
    assert name == "cuda:1" and "offloads to one device; using CUDA1" in note
    assert placement.parse_device_list("none") == ("cpu", None)
    assert placement.parse_device_list("auto") == ("auto", None)
    with pytest.raises(InputError, match="this machine has 2 CUDA devices"):
        placement.parse_device_list("CUDA2")


# ---- item 15: values llama.cpp defines are followed and logged; others refused -------------

def test_max_steps_sentinels_and_negatives(model_path):
    res = run(["-m", model_path, "-p", "x", "--no-perf", "-dev", "cpu", "--json",
               "--diffusion-eb-max-steps", "0", "--diffusion-eb-stability", "0",
               "--diffusion-eb-confidence", "100"])
    assert res.exit_code == 0
    assert "--diffusion-eb-max-steps 0 means not given" in res.stderr and "max_steps=48" in res.stderr
    for flag, value in (("--diffusion-eb-max-steps", "-3"), ("--diffusion-eb-t-max", "-0.5"),
                        ("--diffusion-eb-stability", "-2")):
        res = run(["-m", model_path, "-p", "x", *FAST, flag, value])
        assert res.exit_code == 2 and f"bad value for {flag}" in one_error(res), flag


@pytest.mark.parametrize("n", ["0", "-5", "-2"])
def test_n_predict_without_a_meaning_is_refused(model_path, n):
    res = run(["-m", model_path, "-p", "x", *FAST, "-n", n])
    assert res.exit_code == 2 and f"bad value for -n/--predict: {n}" in one_error(res)


def test_threads(monkeypatch):
    monkeypatch.setattr(options_mod, "usable_cpus", lambda: 2)
    for t in ("0", "-5", "-1"):
        o = parse(["-m", "x", "-t", t])
        o._threads()
        assert o.threads == 2 and o.notes == [f"diffcli: -t {t}: using all 2 CPUs (llama.cpp's "
                                               "meaning of N <= 0)"]
    o = parse(["-m", "x", "-t", "64"])
    o._threads()
    assert o.threads == 64 and "warning: -t 64 is more threads than the 2 CPUs" in o.notes[0]
    o = parse(["-m", "x"])
    o._threads()
    assert o.threads == -1 and o.notes == []                   # not given: torch's default
    o = parse(["-m", "x", "-t", "2"])
    o._threads()
    assert o.threads == 2 and o.notes == []


def test_context_raised_or_beyond_training_is_logged(model_path):
    res = run(["-m", model_path, "-p", "x", *FAST, "-c", "5", "-n", "16"])
    assert res.exit_code == 0
    assert "diffcli: -c 5 raised to 2064 to fit -n 16 (1 canvas of 16 + 2048" in res.stderr
    assert "n_ctx=2064" in res.stderr
    res = run(["-m", model_path, "-p", "x", *FAST, "-c", "5000"])   # the tiny model: 4096
    assert res.exit_code == 0
    assert "warning: -c 5000 is more than the 4096 tokens the model was trained on" in res.stderr
    quiet = run(["-m", model_path, "-p", "x", *FAST, "-c", "3000", "-n", "16"])
    assert "raised" not in quiet.stderr and "trained on" not in quiet.stderr


def test_reasoning_budget_zero_over_think_is_logged(model_path):
    res = run(["-m", model_path, "-p", "x", *FAST, "--think", "--reasoning-budget", "0"])
    assert res.exit_code == 0
    assert "--reasoning-budget 0 turns thinking off; it overrides --think" in res.stderr
    assert "thinking off" in res.stderr
    res = run(["-m", model_path, "-p", "x", *FAST, "--reasoning-budget", "-2"])
    assert res.exit_code == 2 and "--reasoning-budget" in one_error(res)


@pytest.mark.parametrize("args,needle", [(["-ngl", "-3"], "-ngl/--n-gpu-layers"),
                                         (["-ncmoe", "-1"], "-ncmoe/--n-cpu-moe")])
def test_negative_layer_counts_are_refused(model_path, args, needle):
    res = run(["-m", model_path, "-p", "x", *FAST, *args])
    assert res.exit_code == 2 and needle in one_error(res)


# ---- item 16: help and start-up ------------------------------------------------------------

def test_help_lists_commands_and_groups():
    res = run(["--help"])
    assert res.exit_code == 0
    out = res.stdout
    for name in ("run", "serve", "inspect", "convert"):
        assert f"\n  {name} " in out
    titles = ["Model and placement (run):", "Generation (run):", "Sampler (entropy-bound) (run):",
              "Display and output (run):", "Chat and thinking (run):",
              "Accepted for compatibility (no effect) (run):"]
    at = [out.index(t) for t in titles]
    assert at == sorted(at)
    assert "-f, --file FILE " in out and "-sysf, --system-prompt-file FILE" in out
    compat = out[out.index(titles[-1]):]
    for flag in ("--temp, --temperature", "--min-p", "-fa, --flash-attn", "--diffusion-steps"):
        assert flag in compat
    sub = run(["-m", "x", "--help"])                 # the run command's own help is grouped too
    assert sub.exit_code == 0 and "Model and placement options:" in sub.stdout
    serve = run(["serve", "--help"])
    assert serve.exit_code == 0 and "Server options:" in serve.stdout and "--port" in serve.stdout


@pytest.mark.parametrize("args,light", [(["--help"], True), (["--version"], True),
                                        (["inspect", "--help"], True), (["convert", "--help"], False)])
def test_help_and_version_import_no_torch(args, light):
    # what makes them start fast (timed in scripts/bench_startup.py): torch is never imported,
    # nor numpy but for convert (its output types come from the converter)
    code = ("import sys\nfrom diffcli.cli.main import cli\ntry:\n"
            f"    cli.main({args!r}, prog_name='diffcli')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nprint('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    torch_in, numpy_in = out.stdout.strip().splitlines()[-1].split()
    assert torch_in == "False" and (numpy_in == "False" or not light)
