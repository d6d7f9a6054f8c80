"""`-hf USER/REPO[:QUANT]`: a GGUF from the Hugging Face hub, as llama.cpp's -hf has it.

The repository's files are listed, one GGUF is picked for the quant tag (`pick_model`: the file
whose name carries the tag, case-insensitive; without a tag Q4_K_M, else the repository's first
GGUF), and `huggingface_hub` downloads it into its cache (with its progress bar on stderr) or
finds it there. `--offline` (or HF_HUB_OFFLINE=1) looks in the cache only. With --image and no
--mmproj the repository's mmproj file comes too, as llama.cpp fetches it for -hf.

huggingface_hub is optional: without it -hf stops with one line saying how to install it.
HF_ENDPOINT, HF_HUB_CACHE and HF_HOME are read when -hf runs (huggingface_hub reads them once,
at import), so a mirror or a cache set in the environment is always the one used.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..errors import InputError, RuntimeFailure

DEFAULT_QUANT = "Q4_K_M"
_REPO = re.compile(r"[\w.-]+/[\w.-]+")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass
class Resolved:
    model: str                 # local path of the GGUF
    mmproj: str | None = None  # local path of the repository's mmproj, when one was asked for


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'user/model[:quant]' -> (repo, quant or None)."""
    repo, _, quant = str(spec).strip().partition(":")
    if not _REPO.fullmatch(repo) or (_ and not quant):
        raise InputError(f"-hf {spec!r} is not USER/REPO[:QUANT]",
                         fix="write e.g. -hf unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M")
    return repo, quant or None


def _is_mmproj(path: str) -> bool:
    return "mmproj" in PurePosixPath(path).name.lower()


def _has_tag(path: str, tag: str) -> bool:
    name = PurePosixPath(path).name.upper()
    return re.search(rf"(?<![A-Z0-9]){re.escape(tag.upper())}(?![A-Z0-9])", name) is not None


def pick_model(files: list[str], quant: str | None, repo: str) -> str:
    """The GGUF llama.cpp's -hf takes for `quant`: among the model GGUFs (not mmproj), the first
    (in path order) whose name carries the tag; with no tag Q4_K_M, falling back to the first
    GGUF. Split files (-00001-of-00003) are refused: diffcli reads single files."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and not _is_mmproj(f))
    if not ggufs:
        raise InputError(f"-hf {repo}: the repository has no GGUF file",
                         fix="pick a repository of GGUF files (their names end in .gguf)")
    tag = quant or DEFAULT_QUANT
    matches = [f for f in ggufs if _has_tag(f, tag)]
    if not matches:
        if quant is not None:
            tags = sorted({m.group(0).upper() for f in ggufs for m in
                           [re.search(r"(?:I?Q\d\w*|BF16|F16|F32)(?=\.gguf$|-\d{5}-of)", f, re.I)]
                           if m})
            have = ", ".join(tags) if tags else ", ".join(PurePosixPath(f).name for f in ggufs[:5])
            raise InputError(f"-hf {repo}:{quant}: no GGUF of that quant in the repository",
                             fix=f"use one of {have}")
        matches = ggufs
    chosen = matches[0]
    split = _SPLIT.search(chosen)
    if split:
        raise InputError(f"-hf {repo}: {chosen} is split in {int(split.group(2))} parts, which "
                         "diffcli does not read", fix="merge them with llama-gguf-split --merge "
                         "and pass the file with -m, or pick another quant")
    return chosen


def pick_mmproj(files: list[str], quant: str | None) -> str | None:
    """The repository's mmproj GGUF: one carrying the quant tag, else an F16/BF16 one, else the
    first (path order); None when there is none."""
    found = sorted(f for f in files if f.lower().endswith(".gguf") and _is_mmproj(f))
    for want in ([quant] if quant else []) + ["F16", "BF16"]:
        for f in found:
            if _has_tag(f, want):
                return f
    return found[0] if found else None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "on", "yes", "true")


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None                            # huggingface_hub's default (~/.cache/huggingface/hub)


def _size(n: int | None) -> str:
    if not n:
        return "size unknown"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def resolve(spec: str, hf_file: str | None = None, *, token: str | None = None,
            offline: bool = False, mmproj: bool = False, log=None) -> Resolved:
    """Download (or find in the cache) the GGUF `spec` names; `mmproj`: its mmproj too."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise RuntimeFailure("-hf needs the huggingface_hub package, which is not installed",
                             fix="pip install huggingface_hub (or diffcli[hf]), or download the "
                             "GGUF yourself and pass it with -m") from None
    if log is None:
        import click

        def log(msg: str) -> None:
            click.echo(msg, err=True)
    repo, quant = parse_spec(spec)
    offline = offline or _truthy(os.environ.get("HF_HUB_OFFLINE"))
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    cache = _cache_dir()
    common = dict(cache_dir=cache, token=token or None)
    where = "the Hugging Face cache" if offline else endpoint

    try:
        if offline:
            root = hub.snapshot_download(repo, local_files_only=True, **common)
            files = [str(p.relative_to(root)).replace(os.sep, "/")
                     for p in _walk(root)]
            sizes: dict[str, int] = {}
        else:
            api = hub.HfApi(endpoint=endpoint, token=token or None)
            entries = [e for e in api.list_repo_tree(repo, recursive=True)
                       if isinstance(e, hub.hf_api.RepoFile)]
            files = [e.path for e in entries]
            sizes = {e.path: e.size for e in entries}
        try:
            name = hf_file or pick_model(files, quant, repo)
        except InputError:
            if not offline:
                raise
            held = ", ".join(f for f in files if f.lower().endswith(".gguf")) or "no GGUF"
            raise InputError(f"-hf {spec}: not in the Hugging Face cache (it holds {held})",
                             fix="run once without --offline (and without HF_HUB_OFFLINE) to "
                             "download it") from None
        if hf_file is not None and hf_file not in files:
            raise InputError(f"-hff {hf_file}: no such file in {repo}",
                             fix="check the name (the repository's file list is on its page)")
        wanted = [name]
        extra = pick_mmproj(files, quant) if mmproj else None
        if extra is not None:
            wanted.append(extra)
        paths = []
        for filename in wanted:
            if not offline:
                log(f"diffcli: -hf {spec}: {filename} ({_size(sizes.get(filename))}) from "
                    f"{endpoint}, into the Hugging Face cache")
            paths.append(hub.hf_hub_download(repo, filename, local_files_only=offline,
                                             endpoint=None if offline else endpoint, **common))
    except hub_errors.GatedRepoError as exc:
        raise InputError(f"-hf {repo}: the repository is gated ({_first_line(exc)})",
                         fix="accept its terms on the hub and pass -hft TOKEN (or set HF_TOKEN)") \
            from None
    except hub_errors.RepositoryNotFoundError:
        raise InputError(f"-hf {repo}: no such repository at {where} (or it is private)",
                         fix="check the name, or pass -hft TOKEN for a private one") from None
    except hub_errors.LocalEntryNotFoundError:
        if offline:
            raise InputError(f"-hf {spec}: not in the Hugging Face cache", fix="run once without "
                             "--offline (and without HF_HUB_OFFLINE) to download it") from None
        raise RuntimeFailure(f"-hf {spec}: cannot reach {endpoint}, and the file is not in the "
                             "Hugging Face cache", fix="check the network") from None
    except hub_errors.EntryNotFoundError:
        raise InputError(f"-hf {spec}: the file is not in the repository",
                         fix="check -hff, or leave it out to pick by quant") from None
    except hub_errors.HfHubHTTPError as exc:
        raise RuntimeFailure(f"-hf {spec}: the hub answered {_first_line(exc)}",
                             fix="try again later, or pass -hft TOKEN") from None
    except OSError as exc:             # no network, a full disk, an unwritable cache
        raise RuntimeFailure(f"-hf {spec}: {type(exc).__name__}: {_first_line(exc)}",
                             fix="check the network and the cache directory (HF_HUB_CACHE), "
                             "or use --offline for a model already downloaded") from None
    except InputError:
        raise
    except Exception as exc:           # the HTTP client's own errors (connection refused, ...)
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests",
                                                  "urllib3", "huggingface_hub"):
            raise RuntimeFailure(f"-hf {spec}: cannot reach {endpoint} ({_first_line(exc)})",
                                 fix="check the network, or use --offline for a model already "
                                 "downloaded") from None
        raise
    log(f"diffcli: -hf {spec}: {paths[0]}")
    return Resolved(paths[0], paths[1] if len(paths) > 1 else None)


def _walk(root: str):
    from pathlib import Path
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
