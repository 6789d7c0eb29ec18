"""`marlin-mlx convert`: Hugging Face checkpoint -> mlx-lm-format quantized folder (or back).

Registered on the app in cli/main.py with `app.command(name="convert")(convert)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import UserErrors

_RECIPE_HELP = ("Mixed precision: a preset or role=bits[:group] pairs (roles: attn, ffn_gate, "
                "ffn_up, ffn_down, lm_head, embed, default), e.g. attn=8,ffn_down=6,lm_head=8 "
                "or default=4:128,embed=5:128. "
                "Presets: quality (attn/embed/lm_head/rest 8, ffn_gate/ffn_up 4, ffn_down 6); "
                "mixed-4-6 (rest 4, attn 6, ffn_down 6, lm_head 8); "
                "mixed-3-4 (rest 4, ffn_gate/ffn_up 3, ffn_down 6, lm_head 8); "
                "mixed-4.5 (rest 4-bit g128, embed/lm_head 5-bit g128: 4.43 bpw on demo-base, "
                "below 4-bit g64's size). Affine only.")


def convert(
    src: str = typer.Argument(..., help="Hugging Face model folder or repo id."),
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty)."),
    fmt: str = typer.Option("affine", "--format", help="affine, mxfp4 or nvfp4."),
    bits: Optional[int] = typer.Option(None, "--bits",
                                       help="Bits per weight (affine 2-8, default 4)."),
    group_size: Optional[int] = typer.Option(
        None, "--group-size", help="Group size (affine 32/64/128, default 64; mxfp4 32; "
                                   "nvfp4 16)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Dtype of scales and float layers: float32, float16 or bfloat16 "
                              "(default: the source's)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help=_RECIPE_HELP),
    target_bpw: Optional[float] = typer.Option(
        None, "--target-bpw", help="Average bits per weight (whole model) not to exceed: "
                          "per-layer affine bits (2-8) and group size (32/64/128, or only "
                          "--group-size if given) chosen from each layer's estimated effect on "
                          "the loss (one forward + backward pass on --calibration text)."),
    method: str = typer.Option(
        "rtn", "--method", help="rtn (round to nearest) or gptq (needs --calibration; holds the "
                                "float model and its Hessians in memory: small models)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration",
                                               help="Calibration text file (gptq, --target-bpw)."),
    num_samples: int = typer.Option(128, "--num-samples",
                                    help="Calibration windows of --seq-len tokens (gptq)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration window (gptq)."),
    act_order: bool = typer.Option(False, "--act-order",
                                   help="GPTQ: process columns by decreasing Hessian diagonal."),
    dequantize: bool = typer.Option(False, "--dequantize",
                                    help="Quantized mlx-lm SRC -> float OUT."),
    shard_size: float = typer.Option(5.0, "--shard-size", help="Max shard size in GB."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Quantize a Hugging Face checkpoint into mlx-lm's format (loads in marlin-mlx and mlx-lm).

    Layers whose input dimension the group size does not divide stay in float (listed as notes).
    A GPTQ or AWQ SRC (qweight/qzeros/scales) is written as affine exactly as stored, with no
    second rounding (no quantization options apply; act-order layers are refused).
    The output is written to a temporary folder and renamed at the end: an interrupted run
    leaves nothing at OUT.

    \b
    Examples:
      marlin-mlx convert Qwen/Qwen3-0.6B ./qwen3-0.6b-4bit --bits 4 --group-size 64
      marlin-mlx convert ./Llama-3.2-1B ./llama-mixed --recipe mixed-4-6
      marlin-mlx convert ./Llama-3.2-1B ./llama-4.5 --target-bpw 4.5 --calibration text.txt
      marlin-mlx convert ./Qwen3-8B-GPTQ-Int4 ./qwen3-8b-affine
      marlin-mlx convert ./qwen3-4bit ./qwen3-bf16 --dequantize --dtype bfloat16
    """
    with UserErrors():
        if num_samples < 1:
            raise ValueError(f"--num-samples {num_samples}: must be positive")
        if seq_len < 2:
            raise ValueError(f"--seq-len {seq_len}: must be at least 2")
        if calibration is not None and method != "gptq" and target_bpw is None:
            raise ValueError("--calibration is only used with --method gptq or --target-bpw")
        from marlin_mlx.convert import convert as run

        result = run(src, out, fmt=fmt, bits=bits, group_size=group_size, dtype=dtype,
                     recipe=recipe, dequantize=dequantize, method=method, target_bpw=target_bpw,
                     calibration=calibration, num_samples=num_samples, seq_len=seq_len,
                     act_order=act_order,
                     shard_size_gb=shard_size, force=force, progress=not quiet,
                     log=lambda s: typer.echo(s, err=True))
        size_mb = result.nbytes / 1e6
        typer.echo(f"wrote {result.out}: {result.tensors} tensors in {result.shards} shard(s), "
                   f"{size_mb:.1f} MB, {result.bits_per_weight:.3f} bits per weight"
                   + (f" (quantized layers {result.quantized_bits_per_weight:.3f})"
                      if result.quantized_bits_per_weight else ""))
