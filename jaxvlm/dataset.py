"""A dataset at a time: answer one prompt (or each row's own) about every image of a folder or a JSONL file,
in batches, writing one JSON line per image as results come.

    jaxvlm.dataset.generate_all(model, "photos/", "caption en", "captions.jsonl", batch_size=8)

Each output line is {"image": ..., "prompt": ..., "answer": ...}, or {"image": ..., "prompt": ..., "error":
...} for an image that cannot be read: it is named there and the run goes on. Run again with the same
output file, it resumes: the (image, prompt) pairs already written are not done again, and a last line cut
short by a killed run is written anew.

A folder gives its image files (by extension, sorted by name, not recursing). A JSONL file gives one row a
line: {"image": path, relative to the JSONL file's folder unless absolute, "prompt": optional, overrides
the prompt given}.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from jaxvlm import checks
from jaxvlm.images import ImageError, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_items(source: str | os.PathLike, prompt: str | None) -> list[dict[str, str]]:
    """[{"image": path, "prompt": prompt}] for a folder of images or a JSONL file; a ValueError naming the
    folder, or the file and line, for a folder with no images, a line that is not a JSON object or that
    lacks its field."""
    source = os.fspath(source)
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source)
                       if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(source, n)))
        if not names:
            raise ValueError(f"{source}: no images in this folder (files ending in {', '.join(IMAGE_EXTENSIONS)})")
        if prompt is None:
            raise ValueError("prompt: a folder of images needs a prompt to ask about each")
        return [{"image": os.path.join(source, n), "prompt": prompt} for n in names]
    if not os.path.isfile(source):
        raise ValueError(f"{source}: no such folder or JSONL file")
    return read_jsonl(source, {"image": None, "prompt": prompt})


def read_jsonl(path: str | os.PathLike, fields: dict[str, str | None],
               optional: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a JSONL file, one JSON object a line (blank lines skipped), each with the string `fields`
    (a field's default stands in when a row lacks it; None: required unless `optional` names it). An
    "image" path is taken relative to the file's folder, as "path" beside it. A ValueError names the file
    and line of a line that is not a JSON object, lacks a field or gives a non-string."""
    path = os.fspath(path)
    rows, root = [], os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
            row = {}
            for field, default in fields.items():
                value = data.get(field, default)
                if value is None and field in optional:
                    continue
                if value is None:
                    given = " (and no prompt was given for every row)" if field == "prompt" else ""
                    raise ValueError(f"{where}: lacks its field {field!r}{given}")
                if not isinstance(value, str):
                    raise ValueError(f"{where}: field {field!r} must be a string, got {value!r:.40}")
                row[field] = value
            if "image" in row:
                row["path"] = os.path.join(root, row["image"])
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows in this JSONL file")
    return rows


def _done(out: str) -> set[tuple[str, str]]:
    """The (image, prompt) pairs `out` holds already; a last line cut short is cut off the file."""
    if not os.path.exists(out):
        return set()
    done, keep = set(), 0
    with open(out, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
                done.add((row["image"], row["prompt"]))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                if line.endswith(b"\n"):
                    raise ValueError(f"{out}: line {len(done) + 1} is not a result line; give another --out "
                                     "or remove the file") from None
                break  # the last line, cut short by a killed run: written again
            keep += len(line)
    if keep != os.path.getsize(out):
        with open(out, "r+b") as f:
            f.truncate(keep)
    return done


def _batches(items: Sequence[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def generate_all(model, source: str | os.PathLike, prompt: str | None, out: str | os.PathLike, batch_size: int = 8,
                 progress: bool = True, **generate_kwargs: Any) -> int:
    """Answers `prompt` about every image of `source` (a folder or a JSONL file, see the module docstring)
    in batches of `batch_size`, appending a JSON line per image to `out` as each batch finishes, and
    returns how many lines it wrote. `generate_kwargs` go to `Model.generate`."""
    batch_size = checks.integer("batch_size", batch_size, 1)
    model._require_vision("images")
    items = read_items(source, prompt)
    out = os.fspath(out)
    done = _done(out)
    todo = [item for item in items if (item["image"], item["prompt"]) not in done]
    written = 0
    with open(out, "a", encoding="utf-8") as f, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc="images", unit="image",
                 disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(todo, batch_size):
            lines, ready, images = {}, [], []
            for i, item in enumerate(batch):
                try:
                    images.append(load_image(item.get("path", item["image"])))
                    ready.append(i)
                except (ImageError, OSError) as e:
                    lines[i] = {"image": item["image"], "prompt": item["prompt"], "error": str(e)}
            if ready:
                answers = model.generate([batch[i]["prompt"] for i in ready], image=images, **generate_kwargs)
                for i, answer in zip(ready, answers):
                    lines[i] = {"image": batch[i]["image"], "prompt": batch[i]["prompt"], "answer": answer}
            for i in range(len(batch)):
                f.write(json.dumps(lines[i], ensure_ascii=False) + "\n")
            f.flush()
            written += len(batch)
            bar.update(len(batch))
    return written
