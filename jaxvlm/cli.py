"""The `jaxvlm` command: convert, export-hf, generate (one prompt, streamed, or a dataset of images), serve,
train, train-shapes."""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _generate(args) -> None:
    model = _load(args)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                    min_new_tokens=args.min_new_tokens, stop=args.stop)
    dataset = args.images if args.images is not None else args.prompts
    if dataset is not None:
        from jaxvlm.dataset import generate_all
        flag = "--images" if args.images is not None else "--prompts"
        if args.images is not None and args.prompts is not None:
            raise ValueError("--images and --prompts: give one dataset")
        if args.out is None:
            raise ValueError(f"{flag} needs --out, the JSONL file the answers are written to")
        if args.image is not None:
            raise ValueError(f"--image and {flag}: give one image or a dataset, not both")
        if args.prompts is not None and args.prompt is not None:
            raise ValueError("--prompt and --prompts: the prompts are the rows of --prompts")
        written = generate_all(model, dataset, args.prompt, args.out, args.batch_size, **sampling)
        print(f"wrote {written} lines to {args.out}")
        return
    if args.prompt is None:
        raise ValueError("--prompt is required (or --images / --prompts, a dataset)")
    if args.out is not None:
        raise ValueError("--out is for --images and --prompts: the answers of a dataset")
    image = args.image if args.image is None or len(args.image) > 1 else args.image[0]
    for piece in model.stream(args.prompt, image=image, **sampling):
        print(piece, end="", flush=True)
    print()


def _serve(args) -> None:
    from jaxvlm.server import serve
    if args.allowed_local_media is not None and not os.path.isdir(args.allowed_local_media):
        raise ValueError(f"--allowed-local-media {args.allowed_local_media}: not a folder")
    if args.prefix_cache_mib < 0:
        raise ValueError(f"--prefix-cache-mib must be >= 0, got {args.prefix_cache_mib}")
    mesh = None
    if args.mesh is not None:
        from jaxvlm.sharding import parse_mesh
        mesh = parse_mesh(args.mesh)
    model = _load(args, mesh)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint
                                      else "jaxvlm-shapes")
    serve(model, name, host=args.host, port=args.port, slots=args.slots, cache_size=args.cache_size,
          chunk=args.chunk, max_queue=args.max_queue, allowed_local_media=args.allowed_local_media,
          prefix_cache_bytes=args.prefix_cache_mib << 20)


def _train(args) -> None:
    import jaxvlm
    from jaxvlm.config import LoraConfig
    from jaxvlm.dataset import read_jsonl
    from jaxvlm.train import TrainConfig, finetune
    from jaxvlm import files
    from jaxvlm.train import RUN_FILE
    out = os.path.abspath(args.out)
    workdir = os.path.abspath(args.workdir or os.path.join("runs", os.path.basename(out)))
    # A run extended with a larger --steps writes its --out anew; any other existing --out is refused.
    extending = os.path.lexists(out) and os.path.exists(os.path.join(workdir, RUN_FILE))
    if os.path.lexists(out) and not extending:
        raise ValueError(f"--out {out}: already exists; give a new folder")
    files.check_writable(out, "--out")
    lora = None
    if args.lora_rank is not None:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=targets)
    elif args.lora_alpha is not None or args.lora_targets != DEFAULT_LORA_TARGETS:
        raise ValueError("--lora-alpha and --lora-targets shape the adapters: give them with --lora-rank")
    rows = [{"prompt": r["prompt"], "answer": r["answer"], **({"image": r["path"]} if "image" in r else {})}
            for r in read_jsonl(args.data, {"image": None, "prompt": None, "answer": None}, optional=("image",))]
    model = jaxvlm.load(args.checkpoint, scan_layers=False if lora is not None else None)
    learning_rate = args.learning_rate if args.learning_rate is not None else (1e-2 if lora else 1e-3)
    warmup = args.warmup_steps
    if warmup is None:  # 10 (at most the run's steps); a run resumed or extended keeps its own
        recorded = os.path.join(workdir, RUN_FILE)
        if os.path.exists(recorded):
            warmup = files.read_json(recorded).get("settings", {}).get("warmup_steps")
        warmup = warmup if isinstance(warmup, int) else min(10, args.steps)
    tc = TrainConfig(steps=args.steps, learning_rate=learning_rate, warmup_steps=warmup,
                     final_learning_rate=learning_rate / 100, weight_decay=0.01, checkpoint_every=args.checkpoint_every)
    tuned = finetune(model, rows, tc, batch_size=args.batch_size, seed=args.seed, workdir=workdir, lora=lora)
    if lora is not None and not args.keep_adapters:
        tuned = tuned.merge_lora()
    if extending:
        files.replace_folder(out, tuned.save)
    else:
        tuned.save(out)
    print(f"wrote {out}")


DEFAULT_LORA_TARGETS = "attn/q,attn/v"


def _export_hf(args) -> None:
    import jaxvlm
    out = jaxvlm.load(args.checkpoint).export_hf(args.out_dir)
    print(f"wrote {out}")


def _train_shapes(args) -> None:
    from jaxvlm.shapes.train import main
    main(["--out", args.out, "--workdir", args.workdir])


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("jaxvlm")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help says it already or there is none."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.option_strings and not any(action.default is x for x in (None, False, argparse.SUPPRESS)) \
                and "default" not in help:
            help += " (default: %(default)s)"
        return help


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """How a command that runs a model loads it: dtypes and int8 (`_load`)."""
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the params' dtype (default: as stored)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                   help="the computation's dtype (default: the params')")
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                   help="the KV cache's dtype (default: the computation's)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights with float32 scales (a folder converted with --quantize int8 is int8 already)")
    p.add_argument("--group-size", type=int, default=None, help="with --quantize: one scale per this many inputs")


def _load(args, mesh=None):
    import jaxvlm
    return jaxvlm.load(args.checkpoint, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size,
                       mesh=mesh, compute_dtype=args.compute_dtype, cache_dtype=args.cache_dtype)


def _command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=HelpWithDefaults, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxvlm", description="Run, inspect and convert models in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxvlm {_version()}",
                        help="print jaxvlm's version and exit")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="compile every program anew, keeping none on disk (default: kept under "
                             "$XDG_CACHE_HOME/jaxvlm, else ~/.cache/jaxvlm, for the next run)")
    sub = parser.add_subparsers(dest="command", required=True)

    from convert import cli as convert_cli
    p = _command(sub, "convert", help="convert a Hugging Face checkpoint folder")
    convert_cli.add_arguments(p)
    p.set_defaults(run=convert_cli.run)

    p = _command(sub, "export-hf", help="write a model as a Hugging Face checkpoint folder (transformers loads it)")
    p.add_argument("checkpoint", help="a jaxvlm checkpoint folder (LoRA adapters are merged)")
    p.add_argument("out_dir", help="the Hugging Face folder to create")
    p.set_defaults(run=_export_hf)

    p = _command(sub, "generate", help="generate text from a prompt (and an image), or for a dataset of images")
    p.add_argument("--checkpoint", default=None,
                   help="a jaxvlm checkpoint folder, or a Hugging Face one (converted in memory); "
                        "default: the built-in shapes model")
    p.add_argument("--prompt", default=None, help="the prompt, plain text (vision-language models: without "
                                                  "image tokens, they are placed as the model's processor does)")
    p.add_argument("--image", default=None, action="append",
                   help="an image file, for vision-language models; repeated for models that take several "
                        "(Gemma 3: one per <start_of_image> in the prompt, in order)")
    p.add_argument("--images", default=None,
                   help="a folder of images, or a JSONL file of {\"image\", \"prompt\"} rows: answer each, in "
                        "batches, into --out")
    p.add_argument("--prompts", default=None,
                   help="a JSONL file of {\"prompt\"} rows, for a text model: answer each, in batches, into --out")
    p.add_argument("--out", default=None, help="with --images or --prompts: the JSONL file answers are appended to, "
                                               "one line a row; run again, it resumes where it stopped")
    p.add_argument("--batch-size", type=int, default=8, help="with --images or --prompts: rows generated for at once")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="the most tokens generated per answer (default: the checkpoint's generation_config.json, "
                        "else 32)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 means greedy (default: the checkpoint's generation_config.json "
                        "where it says do_sample, else 0)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide the logits of tokens already seen by this (multiply where negative), as "
                        "transformers does (default: the checkpoint's, else 1)")
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="no end-of-sequence token before this many new tokens (default: the checkpoint's, else 0)")
    p.add_argument("--stop", default=None, action="append",
                   help="stop once the answer holds this text, which is left out; repeated for several")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probabilities add up to p")
    p.add_argument("--seed", type=int, default=0, help="the random seed for sampling")
    _model_arguments(p)
    p.set_defaults(run=_generate)

    p = _command(sub, "serve", help="serve a model over HTTP with OpenAI's API (/v1/completions, "
                                     "/v1/chat/completions), many requests at once")
    p.add_argument("--checkpoint", default=None,
                   help="a jaxvlm checkpoint folder, or a Hugging Face one (converted in memory); "
                        "default: the built-in shapes model")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients give (default: the checkpoint folder's name, or jaxvlm-shapes)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded at once (the running batch)")
    p.add_argument("--cache-size", type=int, default=None,
                   help="cache slots a request may use, its prompt and answer (default: the model's context, at "
                        "most 2048)")
    p.add_argument("--chunk", type=int, default=8, help="decode steps a device call")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; past it, 503 with Retry-After")
    p.add_argument("--mesh", default=None,
                   help="split the model over this host's devices, e.g. data=2,model=4 (axes data, fsdp, model, "
                        "expert; sizes multiplying to the device count); default: one device")
    p.add_argument("--prefix-cache-mib", type=int, default=1024,
                   help="memory kept for the caches of recent prompts, which prompts that begin alike reuse "
                        "(0: none)")
    p.add_argument("--allowed-local-media", default=None,
                   help="a folder whose image files requests may name by path (file://...); default: none, "
                        "images come as data: URLs")
    _model_arguments(p)
    p.set_defaults(run=_serve)

    p = _command(sub, "train", help="fine-tune a model on a JSONL file of {\"image\", \"prompt\", \"answer\"} rows, "
                                     "every param or LoRA adapters")
    p.add_argument("--checkpoint", default=None, help="the model to start from: a jaxvlm or Hugging Face folder "
                                                      "(default: the built-in shapes model)")
    p.add_argument("--data", required=True, help="a JSONL file, a row a line: {\"image\": path relative to the "
                                                 "file (for vision-language models), \"prompt\", \"answer\"}")
    p.add_argument("--out", required=True, help="the folder the fine-tuned model is written to (must not exist, "
                                                "unless it is this run's, extended with a larger --steps)")
    p.add_argument("--workdir", default=None, help="checkpoints, resumed from when run again (default: "
                                                   "runs/<name of --out>)")
    p.add_argument("--steps", type=int, default=100, help="training steps (batches)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="the peak learning rate (default: 1e-2 with LoRA, 1e-3 without)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of linear warm-up before cosine decay (default: 10, at most --steps; a resumed or "
                        "extended run keeps its own)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (default: ten over the run)")
    p.add_argument("--seed", type=int, default=0, help="the order of the rows and the adapters' initial values")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train low-rank adapters of this rank instead of every param")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="the adapters' product is scaled by alpha / rank (default: alpha = rank)")
    p.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS,
                   help="comma-separated projections to adapt, module paths or regular expressions "
                        "(e.g. attn/q,attn/v or decoder/.*/mlp/(gate|up|down))")
    p.add_argument("--keep-adapters", action="store_true",
                   help="save the adapters beside their kernels instead of merged into them")
    p.set_defaults(run=_train)

    p = _command(sub, "compile-report", help="compile a model's programs (prefill, decode, the engine's, training) for "
                                              "a TPU slice on this machine (needs libtpu) and report each program's "
                                              "memory per device")
    p.add_argument("model", help="a preset name (jaxvlm.presets: gemma-2-9b, paligemma2-3b-pt-224, qwen3-30b-a3b, ...)")
    p.add_argument("--topology", default="v5e:2x2", help="the TPU slice: chip and layout (v5e:2x2, v6e:4x4, ...)")
    p.add_argument("--batch", type=int, default=8, help="rows decoded at once")
    p.add_argument("--cache", type=int, default=4096, help="KV cache slots a row")
    p.add_argument("--prompt", type=int, default=1024, help="prefill's prompt length")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="params and computation")
    p.add_argument("--quantize", default=None, choices=["int8"], help="int8 weights")
    p.add_argument("--mesh", default=None, help="the slice's devices as a mesh, e.g. data=2,model=2 "
                                                "(default: all on model)")
    p.add_argument("--scan-layers", action="store_true", help="each stack of layers as one scanned [L, ...] array")
    p.add_argument("--greedy", action="store_true",
                   help="the programs a batch of greedy rows runs (no sampling filters or draw); default: sampling")
    p.add_argument("--programs", default=None,
                   help="comma-separated program names (default: all of jaxvlm.aot.PROGRAMS: prefill, decode, "
                        "minimal_decode, engine_insert, engine_step, train_step)")
    p.add_argument("--largest-batch", action="store_true", help="also search for the largest batch that fits")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_compile_report)

    p = _command(sub, "train-shapes", help="train the built-in shapes model from scratch (seeded)")
    p.add_argument("--out", required=True, help="where to write the trained model (must not exist)")
    p.add_argument("--workdir", default="runs/shapes", help="checkpoints, resumed from when run again")
    p.set_defaults(run=_train_shapes)
    return parser


def _compile_report(args) -> None:
    import json
    from jaxvlm import aot
    settings = dict(cache=args.cache, prompt=args.prompt, dtype=args.dtype, quantize=args.quantize,
                    mesh=args.mesh, scan_layers=args.scan_layers, greedy=args.greedy)
    programs = aot.PROGRAMS if args.programs is None else tuple(p.strip() for p in args.programs.split(","))
    report = aot.report(args.model, args.topology, batch=args.batch, programs=programs, **settings)
    if args.largest_batch:
        report["largest_batch"] = aot.largest_batch(args.model, args.topology, **settings)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    gib = lambda key, p: f"{p[key] / (1 << 30):.2f}" if key in p else "-"
    print(f"{args.model} on {report['topology']} ({report['devices']} devices, {report['hbm_bytes'] / (1 << 30):.1f} "
          f"GiB each), batch {args.batch}, cache {args.cache}, {args.quantize or args.dtype}: GiB per device, "
          "the compiler's figures")
    print(f"{'program':15}{'arguments':>10}{'outputs':>9}{'temps':>8}{'largest':>9}{'code':>7}{'total':>8}  fits"
          f"{'compile s':>11}{'GB read':>9}")
    for name, p in report["programs"].items():
        read = f"{p['bytes_accessed'] / 1e9:9.2f}" if "bytes_accessed" in p else f"{'-':>9}"
        print(f"{name:15}{gib('arguments_bytes', p):>10}{gib('outputs_bytes', p):>9}{gib('temporaries_bytes', p):>8}"
              f"{gib('largest_temporary_bytes', p):>9}{gib('code_bytes', p):>7}{gib('total_bytes', p):>8}  "
              f"{'yes' if p['fits'] else 'no ':4}{p['compile_seconds']:>10.1f}{read}"
              + (f"  ({p['error']})" if "error" in p else ""))
    if "largest_batch" in report:
        print(f"largest batch that fits: {report['largest_batch']}")


def _exit_on_interrupt(signum, frame) -> None:
    """Ctrl-C ends the command at once with one line. (Python's own KeyboardInterrupt can land inside a
    garbage-collection callback of jax, where it is printed with a traceback and then lost.) A write in
    progress installs its own handler first, which cleans up before it reports (`jaxvlm.files.writing`);
    an unfinished training checkpoint is passed over at resume."""
    sys.stdout.flush()
    tqdm = sys.modules.get("tqdm")
    bar_open = tqdm is not None and len(getattr(tqdm.tqdm, "_instances", ())) > 0  # its line is left unended
    os.write(2, b"\nerror: interrupted\n" if bar_open else b"error: interrupted\n")
    os._exit(130)


def main(argv=None) -> None:
    signal.signal(signal.SIGINT, _exit_on_interrupt)
    args = build_parser().parse_args(argv)
    if args.no_compilation_cache:
        os.environ["JAXVLM_COMPILATION_CACHE"] = "0"
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
