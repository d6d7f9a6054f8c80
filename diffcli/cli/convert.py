"""`diffcli convert HF_DIR -o OUT.gguf --outtype q8_0`: the command-line face of `diffcli.convert`."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..gguf.convert import OUTTYPES


@click.command("convert")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("-o", "--outfile", "out", type=click.Path(path_type=Path), default=None,
              help="Output GGUF path [default: HF_DIR/<name>-<outtype>.gguf].")
@click.option("--outtype", type=click.Choice(OUTTYPES, case_sensitive=False), default="bf16",
              show_default=True, help="Tensor type of the weight matrices (norms and the router stay F32).")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--mmproj", is_flag=True,
              help="Write the vision tower instead, as an mmproj file (llama.cpp's Gemma 4 vision "
                   "layout; f32/f16/bf16/q8_0).")
@click.option("--verbose", is_flag=True, hidden=True)
def convert_cmd(hf_dir: Path, out: Path | None, outtype: str, force: bool, mmproj: bool,
                verbose: bool) -> None:
    """Convert a Hugging Face DiffusionGemma checkpoint to a GGUF file (llama.cpp PR #24423 layout),
    or with --mmproj its vision tower to an mmproj GGUF."""
    from ..gguf.convert import convert
    from ..gguf.mmproj import convert_mmproj

    outtype = outtype.lower()
    if out is None:
        stem = f"mmproj-{hf_dir.resolve().name}" if mmproj else hf_dir.resolve().name
        out = hf_dir / f"{stem}-{outtype}.gguf"
    start = time.perf_counter()
    path = (convert_mmproj if mmproj else convert)(hf_dir, out, outtype, overwrite=force)
    size = path.stat().st_size
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    what = "mmproj " if mmproj else ""
    click.echo(f"wrote {what}{path} ({shown}, {outtype}) in {time.perf_counter() - start:.1f} s",
               err=True)
