"""The `jaxvlm` command: convert, generate (one prompt, streamed, or a dataset of images), train-shapes."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> None:
    import jaxvlm
    model = jaxvlm.load(args.checkpoint, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if args.images is not None:
        from jaxvlm.dataset import generate_all
        if args.out is None:
            raise ValueError("--images needs --out, the JSONL file the answers are written to")
        if args.image is not None:
            raise ValueError("--image and --images: give one image or a dataset, not both")
        written = generate_all(model, args.images, args.prompt, args.out, args.batch_size, **sampling)
        print(f"wrote {written} lines to {args.out}")
        return
    if args.prompt is None:
        raise ValueError("--prompt is required (or --images with prompts in its JSONL rows)")
    if args.out is not None:
        raise ValueError("--out is for --images: the answers of a dataset")
    for piece in model.stream(args.prompt, image=args.image, **sampling):
        print(piece, end="", flush=True)
    print()


def _train_shapes(args) -> None:
    from jaxvlm.shapes.train import main
    main(["--out", args.out, "--workdir", args.workdir])


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("jaxvlm")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxvlm", description="Run, inspect and convert models in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxvlm {_version()}",
                        help="print jaxvlm's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    from convert import cli as convert_cli
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder")
    convert_cli.add_arguments(p)
    p.set_defaults(run=convert_cli.run)

    p = sub.add_parser("generate", help="generate text from a prompt (and an image), or for a dataset of images")
    p.add_argument("--checkpoint", default=None,
                   help="a jaxvlm checkpoint folder, or a Hugging Face one (converted in memory); "
                        "default: the built-in shapes model")
    p.add_argument("--prompt", default=None, help="the prompt, plain text (vision-language models: without "
                                                  "image tokens, they are placed as the model's processor does)")
    p.add_argument("--image", default=None, help="an image file, for vision-language models")
    p.add_argument("--images", default=None,
                   help="a folder of images, or a JSONL file of {\"image\", \"prompt\"} rows: answer each, in "
                        "batches, into --out")
    p.add_argument("--out", default=None, help="with --images: the JSONL file answers are appended to, one line "
                                               "per image; run again, it resumes where it stopped")
    p.add_argument("--batch-size", type=int, default=8, help="with --images: images generated for at once")
    p.add_argument("--max-new-tokens", type=int, default=32, help="the most tokens generated per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probabilities add up to p")
    p.add_argument("--seed", type=int, default=0, help="the random seed for sampling")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the params' dtype (default: as stored)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights with float32 scales (a folder converted with --quantize int8 is int8 already)")
    p.add_argument("--group-size", type=int, default=None, help="with --quantize: one scale per this many inputs")
    p.set_defaults(run=_generate)

    p = sub.add_parser("train-shapes", help="train the built-in shapes model from scratch (seeded)")
    p.add_argument("--out", required=True, help="where to write the trained model (must not exist)")
    p.add_argument("--workdir", default="runs/shapes", help="checkpoints, resumed from when run again")
    p.set_defaults(run=_train_shapes)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
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
