"""Command line for the converter, shared by `python -m convert` and `jaxvlm convert`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="a local Hugging Face checkpoint folder (config.json + weights)")
    parser.add_argument("out_dir", help="the jaxvlm checkpoint folder to create")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="parameter dtype (default: bfloat16 if the checkpoint is bfloat16, else float32)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="store every projection, the embedding and the output head as int8 with float32 scales")
    parser.add_argument("--group-size", type=int, default=None,
                        help="with --quantize: one scale per this many inputs (default: one per output channel)")


def run(args: argparse.Namespace) -> None:
    from convert.core import convert
    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convert", description="Convert a Hugging Face checkpoint.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from jaxvlm.cli import run as run_command
    run_command(run, args)
