"""A second scene generator for the built-in model, written apart from `jaxvlm.shapes.scenes`: shapes at
free positions, 15% to 45% of the picture's side, pictures of 64 to 512 pixels drawn directly at their
size, one to three shapes on a plain light or dark background; with the answers to every prompt kind
worked out here from its own geometry.

The task's words are the shared spec: a shape's place is the cell of a 3 x 3 grid that holds its centre;
captions list shapes by row, then column, joined by "above" when the next shape's row is lower and "left
of" when it is on the same row. A centre closer than 4% of the side to a grid line would make that word a
coin toss for a person too, so none is drawn there.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 20),
           "purple": (140, 60, 190), "orange": (245, 135, 20), "black": (20, 20, 20), "white": (250, 250, 250)}
ROW_WORDS, COLUMN_WORDS = ("top", "middle", "bottom"), ("left", "center", "right")
MARGIN = 0.04


def cell_name(row: int, column: int) -> str:
    return "center" if row == column == 1 else f"{ROW_WORDS[row]} {COLUMN_WORDS[column]}"


def make_scene(rng: np.random.Generator) -> dict:
    """{"size", "background", "shapes": [{"kind", "color", "x", "y", "side", "row", "column"}]} in pixels."""
    size = int(rng.integers(64, 513))
    dark = rng.random() < 0.35
    level = rng.uniform(0, 0.33) if dark else rng.uniform(0.7, 1.0)
    background = tuple(int(np.clip(255 * level + rng.normal(0, 12), 0, 255)) for _ in range(3))
    usable = [c for c, rgb in PALETTE.items() if np.linalg.norm(np.subtract(rgb, background)) > 130]
    count = int(rng.integers(1, 4))
    while True:
        shapes = []
        for kind in rng.permutation(KINDS)[:count]:
            side = rng.uniform(0.15, 0.45) * size
            x, y = rng.uniform(side / 2, size - side / 2, size=2)
            thirds = np.array([size / 3, 2 * size / 3])
            if np.abs(thirds - x).min() < MARGIN * size or np.abs(thirds - y).min() < MARGIN * size:
                break
            shapes.append({"kind": str(kind), "color": str(rng.choice(usable)), "x": x, "y": y, "side": side,
                           "row": int(3 * y // size), "column": int(3 * x // size)})
        else:
            cells = {(s["row"], s["column"]) for s in shapes}
            clear = all(abs(a["x"] - b["x"]) > (a["side"] + b["side"]) / 2 + 1
                        or abs(a["y"] - b["y"]) > (a["side"] + b["side"]) / 2 + 1
                        for i, a in enumerate(shapes) for b in shapes[i + 1:])
            if len(cells) == len(shapes) and clear:
                return {"size": size, "background": background, "shapes": shapes}


def render(scene: dict) -> Image.Image:
    image = Image.new("RGB", (scene["size"],) * 2, scene["background"])
    pen = ImageDraw.Draw(image)
    for s in scene["shapes"]:
        half = s["side"] / 2
        box = [s["x"] - half, s["y"] - half, s["x"] + half, s["y"] + half]
        color = PALETTE[s["color"]]
        if s["kind"] == "circle":
            pen.ellipse(box, fill=color)
        elif s["kind"] == "square":
            pen.rectangle(box, fill=color)
        else:
            pen.polygon([(s["x"], box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    return image


def described(s: dict) -> str:
    return ("an " if s["color"][0] in "aeiou" else "a ") + f"{s['color']} {s['kind']}"


def questions(scene: dict, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer): one of each prompt kind, about a random shape or cell."""
    shapes = sorted(scene["shapes"], key=lambda s: (s["row"], s["column"]))
    words = [described(shapes[0])]
    for before, s in zip(shapes, shapes[1:]):
        words.append(("above " if s["row"] > before["row"] else "left of ") + described(s))
    one = shapes[int(rng.integers(len(shapes)))]
    by_cell = {(s["row"], s["column"]): s for s in shapes}
    if rng.random() < 0.5:
        row, column = one["row"], one["column"]
    else:
        row, column = divmod(int(rng.integers(9)), 3)
    there = by_cell.get((row, column))
    return [("caption", "caption en", " ".join(words)),
            ("count", "count shapes", str(len(shapes))),
            ("color", f"what color is the {one['kind']}?", one["color"]),
            ("where", f"where is the {one['kind']}?", cell_name(one["row"], one["column"])),
            ("what", f"what is in the {cell_name(row, column)}?", "nothing" if there is None else described(there))]


def rows(seed: int, scenes: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(scenes):
        scene = make_scene(rng)
        image = render(scene)
        out += [{"image": image, "prompt": p, "answer": a, "kind": k} for k, p, a in questions(scene, rng)]
    return out
