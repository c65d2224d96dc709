"""A dataset at a time: answer one prompt (or each row's own) about every image of a folder or a JSONL file
(or, for a text model, every prompt of a JSONL file), in batches, writing one JSON line per row as
results come.

    jaxvlm.dataset.generate_all(model, "photos/", "caption en", "captions.jsonl", batch_size=8)

Each output line is {"image": ..., "prompt": ..., "answer": ...} ({"line": ..., "prompt": ..., "answer":
...} for text prompts), or the same with "error" in place of "answer" for a row that fails: an image
that cannot be read, a prompt that cannot be encoded or is longer than the context. The error names the
row (its file and line, or the image file), and the run goes on. Run again with the same output file,
it resumes: the rows already written are not done again, and a last line cut short by a killed run is
written anew. Two runs never write one output file at once (a lock beside it; the second is refused,
naming the first).

A folder gives its image files (by extension, sorted by name, not recursing), each named in the output by
its name within the folder, so that `photos`, `./photos` and the absolute path resume alike. A JSONL file
gives one row a line: {"image": path, relative to the JSONL file's folder unless absolute, "prompt":
optional, overrides the prompt given}; for a text model, {"prompt": ...}.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from jaxvlm import checks, files
from jaxvlm.images import ImageError, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_items(source: str | os.PathLike, prompt: str | None, images: bool = True) -> list[dict[str, Any]]:
    """[{"image": name, "path": path, "prompt": prompt, "where": ...}] for a folder of images or a JSONL
    file (with `images=False`, a JSONL file of {"prompt"} rows: [{"line", "prompt", "where"}]); a ValueError
    naming the folder, or the file and line, for a folder with no images, a line that is not a JSON object
    or that lacks its field."""
    source = os.fspath(source)
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if os.path.isdir(source):
        if not images:
            raise ValueError(f"{source}: a folder of images; this model takes text only: give a JSONL file of "
                             "{\"prompt\"} rows")
        names = sorted(n for n in os.listdir(source)
                       if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(source, n)))
        if not names:
            raise ValueError(f"{source}: no images in this folder (files ending in {', '.join(IMAGE_EXTENSIONS)})")
        if prompt is None:
            raise ValueError("prompt: a folder of images needs a prompt to ask about each")
        items = [{"image": _printable(n), "path": os.path.join(source, n), "prompt": prompt,
                  "where": _printable(os.path.join(source, n))} for n in names]
        for item in items:
            if item["image"] != os.path.basename(item["path"]):
                item["error"] = f"{item['where']}: the file name is not UTF-8; rename the file"
        return items
    if not os.path.isfile(source):
        raise ValueError(f"{source}: no such folder or JSONL file")
    if not images:
        rows = read_jsonl(source, {"prompt": prompt})
        return [{"line": r["line"], "prompt": r["prompt"], "where": r["where"]} for r in rows]
    return read_jsonl(source, {"image": None, "prompt": prompt})


def _printable(name: str) -> str:
    """A file name as text: one that is not UTF-8 (undecodable bytes kept as surrogates by the OS layer)
    has those bytes written as \\x.. escapes."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


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
            row["line"], row["where"] = number, where
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows in this JSONL file")
    return rows


def _key(row: dict) -> tuple:
    """What makes an output line the answer to a row: its image (or line) and its prompt."""
    return (row["image"] if "image" in row else row.get("line"), row["prompt"])


def _done(out: str) -> set[tuple]:
    """The rows `out` holds already; a last line cut short is cut off the file, and a last line whole but
    for its newline gets one."""
    if not os.path.exists(out):
        return set()
    done, keep = set(), 0
    with open(out, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                done.add(_key(json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                if line.endswith(b"\n"):
                    raise ValueError(f"{out}: line {number} is not a result line; give another --out "
                                     "or remove the file") from None
                break  # the last line, cut short by a killed run: written again
            keep += len(line)
            ended = line.endswith(b"\n")
    if keep != os.path.getsize(out):
        with open(out, "r+b") as f:
            f.truncate(keep)
    elif keep and not ended:
        with open(out, "ab") as f:
            f.write(b"\n")
    return done


def _batches(items: Sequence[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def generate_all(model, source: str | os.PathLike, prompt: str | None, out: str | os.PathLike, batch_size: int = 8,
                 progress: bool = True, **generate_kwargs: Any) -> int:
    """Answers `prompt` about every image of `source` (a folder or a JSONL file, see the module docstring)
    in batches of `batch_size`, appending a JSON line per row to `out` as each batch finishes, and returns
    how many lines it wrote. For a text model `source` is a JSONL file of {"prompt"} rows. A row that fails
    is written with its error, the others go on. `generate_kwargs` go to `Model.generate`."""
    batch_size = checks.integer("batch_size", batch_size, 1)
    model._require_lm_head()
    model.check_generation(**generate_kwargs)  # a bad setting is the run's fault, not each row's
    images = model.config.vision is not None
    items = read_items(source, prompt, images)
    out = os.fspath(out)
    if os.path.isfile(os.fspath(source)) and os.path.exists(out) and os.path.samefile(source, out):
        raise ValueError(f"--out {out} is the input file itself; give another output file")
    with files.exclusive(os.path.abspath(out) + ".lock", f"{out}"):
        return _generate_all(model, items, out, batch_size, progress, images, generate_kwargs)


def _generate_all(model, items, out, batch_size, progress, images, generate_kwargs) -> int:
    done = _done(out)
    todo = [item for item in items if _key(item) not in done]
    written = 0
    with open(out, "a", encoding="utf-8") as f, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc="rows", unit="row",
                 disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(todo, batch_size):
            results = _answer(model, batch, images, generate_kwargs)
            for item, (field, value) in zip(batch, results):
                line = {k: item[k] for k in ("image" if images else "line", "prompt")}
                f.write(_json_line({**line, field: value}))
            f.flush()
            written += len(batch)
            bar.update(len(batch))
    return written


def _json_line(row: dict) -> str:
    """A JSON line, UTF-8 as it is; text UTF-8 cannot hold (a lone surrogate in a prompt) escaped (\\ud800),
    which JSON readers read back to the same string."""
    text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(row)
    return text + "\n"


def _answer(model, batch: list[dict], images: bool, generate_kwargs) -> list[tuple[str, str]]:
    """("answer", text) or ("error", why) per row. A batch that fails is run again a row at a time, so that
    only the rows at fault fail (named by their file and line, or image)."""
    results: list[tuple[str, str] | None] = [None] * len(batch)
    loaded, ready = [], []
    for i, item in enumerate(batch):
        if not images:
            ready.append(i)
            continue
        if "error" in item:
            results[i] = ("error", item["error"])
            continue
        try:
            loaded.append(load_image(item["path"]))
            ready.append(i)
        except (ImageError, OSError) as e:
            results[i] = ("error", f"{item['where']}: {e}" if "line" in item else str(e))

    def run(rows: list[int], pictures) -> list[str]:
        return model.generate([batch[i]["prompt"] for i in rows], image=pictures, **generate_kwargs)

    pictures = loaded if images else None
    try:
        answers = run(ready, pictures) if ready else []
        for i, answer in zip(ready, answers):
            results[i] = ("answer", answer)
    except ValueError:
        for n, i in enumerate(ready):
            try:
                results[i] = ("answer", run([i], None if pictures is None else [pictures[n]])[0])
            except ValueError as e:
                results[i] = ("error", f"{batch[i]['where']}: {e}")
    return results
