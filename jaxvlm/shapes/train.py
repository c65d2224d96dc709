"""Trains the built-in model from scratch: `python -m jaxvlm.shapes.train [--out DIR] [--workdir DIR]`.

A small PaliGemma-architecture model (a SigLIP-style encoder, a linear projector, a Gemma-style decoder
with multi-head attention, its own SentencePiece tokenizer) learns the shapes task of `scenes.py`.
Everything is seeded: the tokenizer's text, the initial weights and every batch (batch `step` is drawn
from a generator seeded with (SEED, step), so a resumed run sees the same data). The result is written to
`--out`, by default the folder `jaxvlm.load()` opens when given no path.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import jax
import numpy as np

from jaxvlm import checkpoint, files
from jaxvlm.config import DecoderConfig, ImageProcessing, ModelConfig, TokensConfig, VisionConfig
from jaxvlm.data import collate, encode_row
from jaxvlm.shapes import scenes
from jaxvlm.tokenizer import Tokenizer
from jaxvlm.train import TrainConfig, Trainer

SEED = 0  # tokenizer text, initial weights and batches; the accuracy test uses other seeds
MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")
VOCAB_SIZE = 512
IMAGE_TOKEN = "<image>"
SEQUENCE_LENGTH = 60  # 36 image tokens, BOS, the prompt, the answer, EOS: at most 56 here
# Training has two stages. Before this step every scene holds one shape and every prompt is a caption:
# with nothing else in the picture, the encoder learns what a circle, a square and a triangle look like
# several times faster than from the full mix, where most answers first need the right shape found.
SINGLE_SHAPE_STEPS = 1500
KIND_WEIGHTS = {"caption": 0.3, "count": 0.1, "color": 0.2, "where": 0.2, "what": 0.2}  # counting is the easiest

TRAIN = TrainConfig(steps=20000, learning_rate=1e-3, warmup_steps=250, final_learning_rate=1e-5, weight_decay=0.01,
                    b2=0.99, grad_clip_norm=1.0, compute_dtype="bfloat16", checkpoint_every=500)
BATCH_SIZE = 32
# The third stage starts from the second's weights and widens the pictures: shapes anywhere (not only
# inside their grid cell), 12% to 48% of the picture, drawn at 64 to 512 pixels and resized to the
# encoder's 96, as any photo would be. A quarter of its scenes stay grid scenes, which the model keeps.
WIDER = TrainConfig(steps=8000, learning_rate=5e-4, warmup_steps=200, final_learning_rate=1e-5, weight_decay=0.01,
                    b2=0.99, grad_clip_norm=1.0, compute_dtype="bfloat16", checkpoint_every=500)
WIDER_KIND_WEIGHTS = {"caption": 0.35, "count": 0.1, "color": 0.15, "where": 0.2, "what": 0.2}
GRID_FRACTION = 0.25
DRAWN_SIZES = (64, 512)


def train_tokenizer(directory: str) -> Tokenizer:
    """A Gemma-style SentencePiece BPE model (pad 0, eos 1, bos 2, unk 3, `<image>` 4) over the task's text,
    with byte fallback so any other text still encodes."""
    import sentencepiece as spm
    rng = np.random.default_rng([SEED, 1])
    text = []
    for _ in range(2000):
        scene = scenes.random_scene(rng)
        for _, prompt in scenes.prompts_for(scene):
            text += [prompt, scenes.answer(scene, prompt)]
    text.append("abcdefghijklmnopqrstuvwxyz 0123456789 ?!.,:;'-")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=os.path.join(directory, "tokenizer"), vocab_size=VOCAB_SIZE,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=[IMAGE_TOKEN], num_threads=1, minloglevel=2)
    os.remove(os.path.join(directory, "tokenizer.vocab"))
    return Tokenizer.from_dir(directory, TOKENS)


TOKENS = TokensConfig(bos_id=2, eos_ids=(1,), pad_id=0, add_bos=True)

CONFIG = ModelConfig(
    decoder=DecoderConfig(vocab_size=VOCAB_SIZE, width=128, depth=4, num_heads=4, num_kv_heads=4, head_dim=32,
                          mlp_dim=512, mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True,
                          tie_embeddings=True, max_position_embeddings=256),
    tokens=TOKENS,
    # 96 pixels in 16-pixel patches: 36 image tokens, each grid cell exactly 2x2 patches, with shapes large
    # enough (17 to 29 pixels) that a circle and a square differ clearly; at 64 pixels the model confused
    # them for thousands of steps.
    vision=VisionConfig(image_size=96, patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=512),
    image_processing=ImageProcessing(size=(96, 96)),
    projector="linear", image_token_id=4, prefix_lm=True, position_offset=1, prompt_format="images_first",
)


def batches(tokenizer: Tokenizer, batch_size: int = BATCH_SIZE, seed: int = SEED, wider: bool = False):
    """batch(step): fresh scenes drawn from a generator seeded with (seed, step), or with (seed, 3, step)
    for the third stage (`wider`)."""
    weights = WIDER_KIND_WEIGHTS if wider else KIND_WEIGHTS
    kinds, p = list(weights), np.array(list(weights.values()))

    def batch(step: int):
        rng = np.random.default_rng([seed, 3, step] if wider else [seed, step])
        first_stage = not wider and step < SINGLE_SHAPE_STEPS
        examples = []
        for i in range(batch_size):
            if wider and rng.random() >= GRID_FRACTION:
                scene = scenes.free_scene(rng)
                image = scenes.draw(scene, int(rng.integers(DRAWN_SIZES[0], DRAWN_SIZES[1] + 1)))
            else:
                scene = scenes.random_scene(rng, max_shapes=1 if first_stage else 3)
                image = scenes.draw(scene)
            kind = "caption" if first_stage else kinds[rng.choice(len(kinds), p=p)]
            prompt = scenes.ask(scene, kind, rng)
            row = {"image": image, "prompt": prompt, "answer": scenes.answer(scene, prompt)}
            examples.append(encode_row(CONFIG, tokenizer, row, f"step {step} row {i}"))
        return collate(examples, CONFIG.tokens.pad_id, SEQUENCE_LENGTH)

    return batch


def init_params(seed: int = SEED):
    return checkpoint.init_params(CONFIG, jax.random.key(seed))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=MODEL_DIR, help="where to write the trained model (must not exist)")
    parser.add_argument("--workdir", default=os.path.join("runs", "shapes"),
                        help="checkpoints, resumed from when the run is started again")
    parser.add_argument("--wider-from", default=None,
                        help="run the third stage alone, from this model folder's weights (the first two "
                             "stages' result, e.g. an earlier built-in model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} already exists; remove it or choose another folder")

    from jaxvlm.checkpoint import save_model
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = train_tokenizer(tok_dir)
        started = time.time()
        if args.wider_from is None:  # stages one and two: grid scenes
            params = Trainer(CONFIG, TRAIN, os.path.join(args.workdir, "grid")).fit(init_params(),
                                                                                   batches(tokenizer)).params
        else:
            params = checkpoint.load_params(args.wider_from, CONFIG, np.float32, scan_layers=False)
        state = Trainer(CONFIG, WIDER, os.path.join(args.workdir, "wider")).fit(params, batches(tokenizer, wider=True))
        minutes = (time.time() - started) / 60
        params = jax.tree.map(lambda p: np.asarray(p, np.float32), state.params)
        save_model(args.out, CONFIG, params, files.snapshot(tok_dir, ("tokenizer.model",)))
    print(f"trained in {minutes:.1f} min; model written to {args.out}")


if __name__ == "__main__":
    main()
