"""The `jaxvlm` command: convert, generate, train-shapes."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> None:
    import jaxvlm
    model = jaxvlm.load(args.checkpoint, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    print(model.generate(args.prompt, image=args.image, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))


def _train_shapes(args) -> None:
    from jaxvlm.shapes.train import main
    main(["--out", args.out, "--workdir", args.workdir])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="jaxvlm", description="Run, inspect and convert models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    from convert import cli as convert_cli
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder")
    convert_cli.add_arguments(p)
    p.set_defaults(run=convert_cli.run)

    p = sub.add_parser("generate", help="generate text from a prompt (and an image)")
    p.add_argument("--checkpoint", default=None,
                   help="a converted jaxvlm checkpoint folder (default: the built-in shapes model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", default=None, help="an image file, for vision-language models")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights with float32 scales (a folder converted with --quantize int8 is int8 already)")
    p.add_argument("--group-size", type=int, default=None, help="with --quantize: one scale per this many inputs")
    p.set_defaults(run=_generate)

    p = sub.add_parser("train-shapes", help="train the built-in shapes model from scratch (seeded)")
    p.add_argument("--out", required=True, help="where to write the trained model (must not exist)")
    p.add_argument("--workdir", default="runs/shapes", help="checkpoints, resumed from when run again")
    p.set_defaults(run=_train_shapes)

    args = parser.parse_args(argv)
    run(args.run, args)


def run(command, args) -> None:
    """Runs a command; its errors, and an interruption, end the program with one line."""
    try:
        command(args)
    except (ValueError, OSError, FloatingPointError) as e:  # the last: training that stopped on NaN losses
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during a write (see jaxvlm.files)
        print(f"error: {e}" if str(e) and " " in str(e) else "error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
