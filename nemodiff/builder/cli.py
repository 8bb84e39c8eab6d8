"""`nemodiff-build`: the command-line front of the builder.

checkpoint ──[builder: CLI]──▶ engine dir ──runtime──▶ Triton
"""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from nemodiff.engine_format import ARCH_TO_SM, DTYPES
from nemodiff.plugins.aot import KernelBuildError

from .build import BuildError, BuildOptions, build_engine
from .checkpoint import CheckpointError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True,
              help="Engine directory to write (created atomically).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bf16",
              help="Weight dtype; fp8 = e4m3 linear weights with per-channel scales.")
@click.option("--arch", type=click.Choice(list(ARCH_TO_SM)), default="cpu", help="Target GPU (or cpu).")
@click.option("--block-length", type=int, default=None, help="Diffusion/spec block length [default: checkpoint's block_size].")
@click.option("--max-seq-len", type=int, default=None,
              help="Longest prompt + generation [default: min(max_position_embeddings, 8192)].")
@click.option("--max-batch-size", type=int, default=8, help="Most requests running at once.")
@click.option("--kv-page-size", type=int, default=16, help="Tokens per KV-cache page.")
@click.option("--kernels/--no-kernels", default=True,
              help="Compile the Triton kernels for the GPU arch (no GPU needed).")
@click.option("--tp", type=int, default=1,
              help="Tensor-parallel ranks (GPUs per engine): one weight shard each; must divide the KV heads.")
@click.option("--overwrite", is_flag=True, help="Replace an existing engine directory.")
def main(hf_dir: Path, output: Path, dtype: str, arch: str, block_length: int | None, max_seq_len: int | None,
         max_batch_size: int, kv_page_size: int, kernels: bool, tp: int, overwrite: bool) -> None:
    """Build a nemodiff engine from a Hugging Face Nemotron-Labs-Diffusion checkpoint in HF_DIR."""
    options = BuildOptions(dtype=dtype, arch=arch, block_length=block_length, max_seq_len=max_seq_len,
                           max_batch_size=max_batch_size, kv_page_size=kv_page_size, kernels=kernels,
                           overwrite=overwrite, tp=tp)

    def progress(total: int):
        return tqdm(total=total, desc="converting layers", unit="layer", disable=None)

    def kernel_progress(total: int):
        return tqdm(total=total, desc="compiling kernels", unit="kernel", disable=None)

    try:
        result = build_engine(hf_dir, output, options, progress=progress, kernel_progress=kernel_progress)
    except (CheckpointError, BuildError, KernelBuildError) as exc:
        raise click.ClickException(str(exc)) from None
    cfg = result.config
    click.echo(f"built engine: {result.engine_dir}")
    click.echo(f"  parameters   {cfg.build.num_parameters / 1e6:.2f} M")
    click.echo(f"  size         {_human_bytes(result.total_bytes)}")
    click.echo(f"  dtype        {cfg.build.dtype}")
    click.echo(f"  arch         {cfg.build.arch} ({cfg.build.sm or 'reference path'})")
    click.echo(f"  block length {cfg.build.block_length}, max seq len {cfg.build.max_seq_len}, "
               f"max batch {cfg.build.max_batch_size}, KV page {cfg.build.kv_page_size}")
    click.echo(f"  draft LoRA   {'yes (r=%d)' % cfg.build.lora.rank if cfg.build.lora else 'none'}")
    if cfg.build.tp > 1:
        click.echo(f"  tensor par.  {cfg.build.tp} ranks (weights.rank*.safetensors)")
    if cfg.vision:
        v = cfg.vision
        click.echo(f"  vision       Pixtral {v.num_hidden_layers} layers, hidden {v.hidden_size}, patch {v.patch_size}, "
                   f"merge {v.spatial_merge_size} -> {v.text_hidden_size} (vision.safetensors)")
    if cfg.build.kernels:
        names = sorted({k["kernel"] for k in cfg.build.kernels})
        click.echo(f"  kernels      {len(cfg.build.kernels)} compiled for {cfg.build.sm} ({', '.join(names)})")


if __name__ == "__main__":
    main()
