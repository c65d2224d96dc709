"""The built-in model: its scenes and answers, its training script's determinism, the shipped checkpoint,
and the README's first command."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxvlm
from jaxvlm.model import BUILTIN_MODEL
from jaxvlm.shapes import scenes
from jaxvlm.shapes import train as shapes_train
from jaxvlm.shapes.evaluate import EVAL_SEED, exact_match, questions
from jaxvlm.train import Trainer
from tests import other_scenes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scenes_have_one_answer_per_prompt():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        assert 1 <= len(scene.shapes) <= 3
        assert len({s.kind for s in scene.shapes}) == len(scene.shapes)  # each kind at most once
        assert len({(s.row, s.column) for s in scene.shapes}) == len(scene.shapes)  # one shape per cell
        assert [(s.row, s.column) for s in scene.shapes] == sorted((s.row, s.column) for s in scene.shapes)
        caption = scenes.answer(scene, "caption en")
        assert caption.count(" a ") + caption.count(" an ") + 1 == len(scene.shapes)
        assert scenes.answer(scene, "count shapes") == str(len(scene.shapes))
    assert len(scenes.COLORS) >= 6


def test_answers_read_off_the_layout():
    c = scenes.SIZE / 3
    scene = scenes.Scene((scenes.Shape("circle", "red", 0, 0, 20, (c / 2, c / 2)),
                          scenes.Shape("square", "blue", 1, 2, 20, (2.5 * c, 1.5 * c)),
                          scenes.Shape("triangle", "orange", 1, 1, 20, (1.5 * c, 1.5 * c))), (255, 255, 255))
    scene = dataclasses.replace(scene, shapes=tuple(sorted(scene.shapes, key=lambda s: (s.row, s.column))))
    assert scenes.answer(scene, "caption en") == "a red circle above an orange triangle left of a blue square"
    assert scenes.answer(scene, "where is the triangle?") == "center"
    assert scenes.answer(scene, "where is the square?") == "middle right"
    assert scenes.answer(scene, "what color is the triangle?") == "orange"
    assert scenes.answer(scene, "what is in the top left?") == "a red circle"
    assert scenes.answer(scene, "what is in the center?") == "an orange triangle"
    assert scenes.answer(scene, "what is in the bottom right?") == "nothing"
    with pytest.raises(ValueError, match="'upper left' is not a place on the grid"):
        scenes.answer(scene, "what is in the upper left?")
    with pytest.raises(ValueError, match="not one the shapes task asks"):
        scenes.answer(scene, "how many?")
    with pytest.raises(ValueError, match="max_shapes=4: a scene holds one to 3 distinct shapes"):
        scenes.random_scene(np.random.default_rng(0), max_shapes=4)
    image = np.asarray(scenes.draw(scene))
    assert image.shape == (scenes.SIZE, scenes.SIZE, 3)
    np.testing.assert_allclose(image[int(c / 2), int(c / 2)], scenes.COLORS["red"], atol=2)


def test_the_shipped_tokenizer_is_the_training_scripts(tmp_path):
    """Byte for byte, but for the temporary folder the trainer records as its model_prefix."""
    from sentencepiece import sentencepiece_model_pb2
    shapes_train.train_tokenizer(str(tmp_path))
    protos = []
    for path in (tmp_path / "tokenizer.model", os.path.join(BUILTIN_MODEL, "tokenizer.model")):
        proto = sentencepiece_model_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        proto.trainer_spec.ClearField("model_prefix")
        protos.append(proto.SerializeToString())
    assert protos[0] == protos[1]


def test_training_is_seeded(tmp_path):
    """Two short runs of the training script's setup give bit-identical weights."""
    tok = shapes_train.train_tokenizer(str(tmp_path))
    batch = shapes_train.batches(tok, batch_size=2)
    np.testing.assert_array_equal(batch(5).pixels, batch(5).pixels)
    config = dataclasses.replace(shapes_train.TRAIN, steps=2, warmup_steps=1, checkpoint_every=None)
    runs = [Trainer(shapes_train.CONFIG, config).fit(shapes_train.init_params(), batch, progress=False)
            for _ in range(2)]
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
        np.testing.assert_array_equal(a, b)


def test_builtin_model_is_small_and_the_default():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(BUILTIN_MODEL) for f in files)
    assert size <= 25 * 2 ** 20
    model = jaxvlm.load()
    assert model.config == shapes_train.CONFIG


def test_builtin_model_answers_held_out_scenes():
    """At least 95% exact match on every prompt kind, greedy, on 200 scenes drawn with a seed training
    never used, each asked one prompt of every kind."""
    accuracy = exact_match(jaxvlm.load(), questions(EVAL_SEED, 200))
    assert set(accuracy) == set(scenes.PROMPT_KINDS)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_builtin_model_answers_scenes_of_another_generator():
    """At least 90% exact match on every prompt kind on pictures drawn by a generator written apart from
    the training one (tests/other_scenes.py: free positions, shapes of 15-45% of the side, 64-512 pixel
    pictures resized to the encoder's 96), 150 scenes, each asked one prompt of every kind."""
    accuracy = exact_match(jaxvlm.load(), other_scenes.rows(2026, 150))
    assert set(accuracy) == set(scenes.PROMPT_KINDS)
    assert min(accuracy.values()) >= 0.90, accuracy


def test_free_scenes_have_one_answer_per_prompt():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = scenes.free_scene(rng)
        assert len({(s.row, s.column) for s in scene.shapes}) == len(scene.shapes)
        for s in scene.shapes:  # the cell is the centre's, the shape wholly inside the picture
            assert (s.row, s.column) == tuple(min(int(v // (scenes.SIZE / 3)), 2) for v in s.center[::-1])
            assert s.size / 2 <= min(s.center) and max(s.center) <= scenes.SIZE - s.size / 2
    image = scenes.draw(scenes.free_scene(rng), 300)
    assert image.size == (300, 300)


def test_readme_first_command_answers_about_the_example_image():
    image = os.path.join(ROOT, "examples", "shapes.png")
    out = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--image", image, "--prompt", "caption en"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "a red circle left of a blue square above a green triangle"
