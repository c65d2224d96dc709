"""A tiny PaliGemma-architecture model, tokenizer and dataset for training tests; run as a module it
trains into a workdir (`python -m tests.tiny_training WORKDIR TOKENIZER_DIR STEPS`), for the tests that
kill a run."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax

from jaxvlm import checkpoint
from jaxvlm.config import ImageProcessing
from jaxvlm.data import RowBatches
from jaxvlm.shapes import examples
from jaxvlm.shapes.train import CONFIG, TOKENS, train_tokenizer
from jaxvlm.tokenizer import Tokenizer
from jaxvlm.train import TrainConfig, Trainer

TINY = dataclasses.replace(
    CONFIG,
    decoder=dataclasses.replace(CONFIG.decoder, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                mlp_dim=64),
    vision=dataclasses.replace(CONFIG.vision, image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
    image_processing=ImageProcessing(size=(16, 16)))


def tokenizer(directory: str) -> Tokenizer:
    if not os.path.isfile(os.path.join(directory, "tokenizer.model")):
        return train_tokenizer(directory)
    return Tokenizer.from_dir(directory, TOKENS)


def init_params(config=TINY, seed: int = 0):
    return checkpoint.init_params(config, jax.random.key(seed))


def rows(count: int = 24, seed: int = 7):
    return examples(seed, count)


def batches(tok: Tokenizer, batch_size: int = 4, config=TINY):
    """Every batch padded to the longest row's bucket (32 tokens): one compiled train step a test, not
    one for each bucket its batches fall in."""
    return RowBatches(config, tok, rows(), batch_size, seed=0, length=32)


def train_config(steps: int, **kwargs) -> TrainConfig:
    """Saved at the last step only (with a workdir) unless `checkpoint_every` says otherwise: the tests of
    periodic saves ask for them."""
    return TrainConfig(**dict(dict(steps=steps, learning_rate=3e-3, warmup_steps=2, compute_dtype="float32",
                                   checkpoint_every=steps), **kwargs))


if __name__ == "__main__":
    workdir, tok_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    Trainer(TINY, train_config(steps, checkpoint_every=1, keep_checkpoints=3), workdir).fit(
        init_params(), batches(tokenizer(tok_dir)), progress=False)
