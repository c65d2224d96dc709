"""A dataset at a time: batches, one JSON line per image as results come, resuming, unreadable images
named in the output, and the bad inputs of a folder or JSONL file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import jaxvlm
from jaxvlm.dataset import generate_all

IMAGE = "examples/shapes.png"


@pytest.fixture(scope="module")
def model():
    return jaxvlm.load()


@pytest.fixture
def folder(tmp_path):
    """Three scenes drawn afresh, and a file that is not an image."""
    from jaxvlm.shapes import scenes
    import numpy as np
    rng = np.random.default_rng(5)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "d.jpg"):
        scenes.draw(scenes.random_scene(rng)).save(images / name)
    (images / "c.png").write_text("not an image")
    (images / "notes.txt").write_text("not an image either, and not an image file name")
    return images


def lines(path):
    return [json.loads(line) for line in open(path)]


def test_a_folder_is_answered_a_line_per_image_in_batches(model, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    assert generate_all(model, folder, "count shapes", out, batch_size=2, progress=False) == 4
    rows = lines(out)
    assert [r["image"] for r in rows] == ["a.png", "b.png", "c.png", "d.jpg"]  # named within the folder
    good = [r for r in rows if "answer" in r]
    assert [r["answer"] for r in good] == model.generate(["count shapes"] * 3,
                                                         image=[str(folder / r["image"]) for r in good])
    bad = rows[2]
    assert "answer" not in bad and "c.png" in bad["error"] and "cannot read the image" in bad["error"]


def test_a_run_resumes_without_redoing_lines(model, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    generate_all(model, folder, "count shapes", out, batch_size=2, progress=False)
    whole = out.read_text()
    kept = whole.splitlines(keepends=True)
    out.write_text("".join(kept[:2]) + kept[2][:10])  # killed while writing the third line
    assert generate_all(model, folder, "count shapes", out, batch_size=2, progress=False) == 2
    assert out.read_text() == whole
    assert generate_all(model, folder, "count shapes", out, progress=False) == 0
    assert generate_all(model, folder, "what color is the circle?", out, progress=False) == 4  # a new prompt
    assert len(lines(out)) == 8


def test_a_jsonl_file_gives_each_row_its_image_and_prompt(model, tmp_path):
    shutil.copy(IMAGE, tmp_path / "scene.png")
    source = tmp_path / "rows.jsonl"
    source.write_text('{"image": "scene.png", "prompt": "count shapes"}\n\n{"image": "scene.png"}\n')
    out = tmp_path / "out.jsonl"
    generate_all(model, source, "caption en", out, progress=False)
    assert lines(out) == [
        {"image": "scene.png", "prompt": "count shapes", "answer": model.generate("count shapes", image=IMAGE)},
        {"image": "scene.png", "prompt": "caption en", "answer": model.generate("caption en", image=IMAGE)}]


@pytest.mark.parametrize("content, message", [
    ('{"image": "a.png", "prompt": "p"}\nnot json\n', r"rows.jsonl, line 2: not JSON \(Expecting value\)"),
    ('["a.png"]\n', "rows.jsonl, line 1: expected a JSON object, got list"),
    ('{"prompt": "count shapes"}\n', "rows.jsonl, line 1: lacks its field 'image'"),
    ('{"image": 3}\n', "rows.jsonl, line 1: field 'image' must be a string, got 3"),
    ('{"image": "a.png"}\n', r"rows.jsonl, line 1: lacks its field 'prompt' \(and no prompt was given"),
    ("\n", "rows.jsonl: no rows in this JSONL file"),
])
def test_bad_jsonl_lines_are_named(model, tmp_path, content, message):
    (tmp_path / "rows.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        generate_all(model, tmp_path / "rows.jsonl", None, tmp_path / "out.jsonl", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out.jsonl").exists()


def test_a_folder_without_images_is_named(model, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path}: no images in this folder"):
        generate_all(model, tmp_path, "count shapes", tmp_path / "out.jsonl", progress=False)
    with pytest.raises(ValueError, match="nowhere: no such folder or JSONL file"):
        generate_all(model, tmp_path / "nowhere", "count shapes", tmp_path / "out.jsonl", progress=False)


def test_the_command_writes_the_lines(folder, tmp_path):
    out = tmp_path / "out.jsonl"
    run = lambda *extra: subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--images", str(folder),
                                         "--prompt", "count shapes", *extra], capture_output=True, text=True)
    result = run("--out", str(out), "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote 4 lines to {out}\n" and len(lines(out)) == 4
    result = run()
    assert result.returncode == 1 and result.stderr == "error: --images needs --out, the JSONL file the answers " \
                                                       "are written to\n"
