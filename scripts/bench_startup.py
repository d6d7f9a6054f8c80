#!/usr/bin/env python3
"""How long `diffcli --help`, `--version` and `inspect --help` take to start, for one or more
source trees side by side (interleaved, so machine load hits them alike).

    .venv/bin/python scripts/bench_startup.py                       # this tree
    .venv/bin/python scripts/bench_startup.py --tree /work/main --tree .   # before / after

Each tree runs as `python -m diffcli ...` with the tree first on sys.path. Reported: the median
wall time and the median CPU time (user + system, which load on a shared machine inflates less)
over --runs runs, per command and tree, and each tree's ratio to the first; and, as the floor
no front end can go under, the interpreter alone and the interpreter importing click.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["--version"], ["inspect", "--help"])
FLOORS = (["-c", "pass"], ["-c", "import click"])


def once(tree: Path, args: list[str]) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "diffcli", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", type=Path,
                    help="a source tree holding diffcli/ (repeatable; default: this one)")
    ap.add_argument("--runs", type=int, default=9)
    a = ap.parse_args()
    trees = [t.resolve() for t in (a.tree or [Path(__file__).resolve().parent.parent])]
    results = {(t, tuple(c)): [] for t in trees for c in COMMANDS + FLOORS}
    for _ in range(a.runs):
        for cmd in COMMANDS + FLOORS:
            for tree in trees if cmd not in FLOORS else trees[:1]:
                results[(tree, tuple(cmd))].append(once(tree, cmd))
    print(f"{'command':<16} {'tree':<28} {'wall s':>8} {'cpu s':>8} {'cpu ratio':>10}")
    for cmd in COMMANDS + FLOORS:
        base = None
        for tree in trees if cmd not in FLOORS else trees[:1]:
            runs = results[(tree, tuple(cmd))]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            base = cpu if base is None else base
            print(f"{' '.join(cmd):<16} {str(tree)[-28:]:<28} {wall:8.3f} {cpu:8.3f} "
                  f"{cpu / base:10.2f}")


if __name__ == "__main__":
    main()
