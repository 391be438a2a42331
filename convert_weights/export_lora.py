"""`python -m convert_weights export-lora --src RUN/checkpoints --dst FILE --format comfyui|diffusers
[--step N] [--ema/--no-ema]`: a LoRA trained by train.py (train.lora set) as a LoRA file.

comfyui: original Wan names (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `.alpha`),
read by ComfyUI, diffusers' `load_lora_weights` and lightx2v; diffusers: PEFT names
(`transformer.blocks.N.attn1.to_q.lora_A.weight`, the alpha / rank scale folded in). Written by
`convert_weights.lora.write_lora` (temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Sequence

from a2jax.runner import run_main
from a2jax.train import checkpointing
from convert_weights import lora


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m convert_weights export-lora",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True, type=pathlib.Path,
                 help="a LoRA run's checkpoints folder ({output_dir}/{run_name}/checkpoints)")
  p.add_argument("--dst", required=True, type=pathlib.Path, help="the .safetensors file to write")
  p.add_argument("--format", required=True, choices=("comfyui", "diffusers"))
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                 help="the EMA adapters when the run keeps them (default), else the trained ones")
  return p.parse_args(argv)


def export(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  adapters, cfg = checkpointing.trained_lora(args.src, args.step, ema=args.ema)
  lora.write_lora(adapters, cfg.alpha, args.dst, args.format)
  print(f"wrote {args.dst}: rank {cfg.rank}, alpha {cfg.alpha:g}, {len(cfg.targets)} target "
        f"projections per block, {args.format} names")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_main(export, argv)
