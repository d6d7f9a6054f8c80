"""The package layout: imports run one way, with no circles, read from the source (ast, nothing is
imported), and the public API the README shows is importable.

Which layer may import which (`MAY_IMPORT`; a module may always import its own layer):

    errors, kernels      nothing from diffcli (kernels take raw bytes and tensors)
    gguf                 file format, block formats, QTensor, conversion
    compute              backend choice, quantized ops, native loader, CUDA graphs
    model                config, weights, placement, layers, the passes
    generation           sampler + loop                 text   tokenizer + chat template
    media                images (and data: URLs) -> the patches the vision tower reads: input
                         handling for the front ends, like text, but needing nothing from it
    engine               what every front end shares (opening a model file with its tokenizer
                         and template, running one request); optional
    serve, cli           the front ends: cli may start the server, the server never imports cli;
                         neither reaches into compute or kernels
    testing, the root    fixtures; the lazy public API

`from diffcli import load` style imports (the root's lazy API, `_API` in diffcli/__init__.py) count
as imports of the module the name lives in.
"""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_CORE = {"errors", "kernels", "gguf", "compute", "model"}
MAY_IMPORT = {
    "errors": set(), "kernels": set(),
    "gguf": {"errors"},
    "compute": {"errors", "kernels", "gguf"},
    "model": {"errors", "kernels", "gguf", "compute"},
    "generation": _CORE,
    "text": {"errors", "gguf"},
    "media": {"errors"},
    "engine": {"errors", "gguf", "model", "generation", "text", "media"},
    "serve": {"errors", "gguf", "model", "generation", "text", "media", "engine"},
    "cli": {"errors", "gguf", "model", "generation", "text", "media", "engine", "serve"},
    "testing": _CORE | {"generation", "text", "media", "engine", "serve", "cli"},
}
MAY_IMPORT[""] = set(MAY_IMPORT) - {""}      # the package root: the lazy public API


def module_files(pkg_dir: Path, kernels_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for diffcli/ and kernels/ (installed as diffcli.kernels)."""
    out = {}
    for base, prefix in ((pkg_dir, "diffcli"), (kernels_dir, "diffcli.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def api_table(init: Path) -> dict[str, str]:
    """The root's lazy API: public name -> module (relative to diffcli)."""
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_API" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imports_of(name: str, path: Path, modules: dict[str, Path], api: dict[str, str]) -> set[str]:
    """Every diffcli module `name` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def resolve(mod: str, level: int) -> str:
        if level == 0:
            return mod
        base = package.split(".")
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([mod] if mod else []))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(node.module or "", node.level)
            targets = []
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                if sub in modules:
                    targets.append(sub)                       # from pkg import module
                elif mod == "diffcli" and alias.name in api:
                    targets.append("diffcli." + api[alias.name])   # the root's lazy API
                else:
                    targets.append(mod)
        else:
            continue
        for t in targets:
            while t and t not in modules:                     # diffcli.x.y.attr -> diffcli.x.y
                t = t.rpartition(".")[0]
            if t.startswith("diffcli") and t != name:
                found.add(t)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else ""


def violations(pkg_dir: Path, kernels_dir: Path) -> list[str]:
    """Upward or sideways imports between layers, and import circles (as readable lines)."""
    modules = module_files(pkg_dir, kernels_dir)
    api = api_table(pkg_dir / "__init__.py")
    graph = {m: imports_of(m, p, modules, api) for m, p in modules.items()}
    problems = []
    for mod, deps in sorted(graph.items()):
        a = layer(mod)
        for dep in sorted(deps):
            b = layer(dep)
            if dep == "diffcli" or (a != b and b not in MAY_IMPORT[a]):
                problems.append(f"{mod} imports {dep} ({a or 'root'} -> {b or 'root'})")
    # circles, package __init__ files included (importing a submodule runs its package first)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                problems.append("circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return problems


def test_imports_run_one_way_without_circles():
    assert violations(ROOT / "diffcli", ROOT / "kernels") == []


def test_no_runtime_module_imports_the_test_fixtures():
    modules = module_files(ROOT / "diffcli", ROOT / "kernels")
    api = api_table(ROOT / "diffcli" / "__init__.py")
    users = [m for m, p in modules.items() if m != "diffcli.testing"
             and "diffcli.testing" in imports_of(m, p, modules, api)]
    assert users == []


@pytest.fixture
def tree_copy(tmp_path):
    pkg, kern = tmp_path / "diffcli", tmp_path / "kernels"
    shutil.copytree(ROOT / "diffcli", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", kern, ignore=shutil.ignore_patterns("__pycache__", "build"))
    return pkg, kern


def plant(path: Path, line: str, inside_function: bool = False) -> None:
    text = path.read_text()
    if inside_function:
        line = f"def _planted():\n    {line}\n"
    path.write_text(text + "\n" + line + "\n")


@pytest.mark.parametrize("target,line,inside,expect", [
    ("gguf/reader.py", "from ..cli import main", False, "diffcli.gguf.reader imports diffcli.cli.main"),
    ("compute/ops.py", "from ..model.config import ModelConfig", True,
     "diffcli.compute.ops imports diffcli.model.config"),
    ("generation/loop.py", "from ..text.tokenizer import Tokenizer", False,
     "diffcli.generation.loop imports diffcli.text.tokenizer"),
    ("model/weights.py", "from .. import stream", True,
     "diffcli.model.weights imports diffcli.generation.loop"),
    ("gguf/quants.py", "from ..testing import toy_vocab", True, "diffcli.gguf.quants imports diffcli.testing"),
    ("cli/session.py", "from ..compute.backend import DTYPES", True,
     "diffcli.cli.session imports diffcli.compute.backend"),
    ("text/chat.py", "from ..generation.loop import stream", True,
     "diffcli.text.chat imports diffcli.generation.loop"),
])
def test_checker_catches_a_planted_upward_import(tree_copy, target, line, inside, expect):
    pkg, kern = tree_copy
    plant(pkg / target, line, inside)
    found = violations(pkg, kern)
    assert any(v.startswith(expect) for v in found), found


def test_checker_catches_a_planted_circle(tree_copy):
    pkg, kern = tree_copy
    plant(pkg / "compute" / "native.py", "from .ops import qlinear", inside_function=True)
    found = violations(pkg, kern)
    assert any(v.startswith("circle:") and "diffcli.compute.native" in v and "diffcli.compute.ops" in v
               for v in found), found


def test_kernels_import_nothing_from_diffcli(tree_copy):
    pkg, kern = tree_copy
    plant(kern / "vocab.py", "from diffcli.gguf import quants", inside_function=True)
    assert any(v.startswith("diffcli.kernels.vocab imports diffcli.gguf.quants")
               for v in violations(pkg, kern))


def test_public_api_shown_in_the_readme_is_importable():
    import diffcli
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    shown = set(re.findall(r"\bdiffcli\.([A-Za-z_]\w*)", block))
    assert {"load", "Tokenizer", "generate", "stream", "open_gguf", "SamplerConfig",
            "convert"} <= shown
    for name in sorted(shown | set(diffcli.__all__)):
        assert callable(getattr(diffcli, name)), name
    import diffcli.generation.loop  # noqa: F401  (a subpackage must not shadow an API name)
    import diffcli.gguf.convert  # noqa: F401
    for name in diffcli.__all__:
        assert callable(getattr(diffcli, name)), name
