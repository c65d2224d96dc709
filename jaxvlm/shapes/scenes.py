"""Scenes of one to three shapes drawn with Pillow, and the prompts the built-in model answers about them.

The canvas is a 3x3 grid; each shape sits in its own cell, at a random size and offset within it, so
"where" and "above / left of" always have one right answer. A scene holds each kind of shape at most
once ("what color is the circle?" names one shape); colours may repeat.

Prompts and answers:
  caption en                   a red circle left of a blue square above a green triangle
  count shapes                 2
  what color is the circle?    red
  where is the square?         top left
  what is in the top left?     a blue square          (or "nothing" for an empty cell)
Captions list the shapes in reading order (top row first, left to right); between two neighbours the
relation is "above" when the second is on a lower row, "left of" when it is on the same row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 135, 20),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
PROMPT_KINDS = ("caption", "count", "color", "where", "what")

SIZE = 128  # pixels per side of a drawn scene
_CELL = SIZE / 3
_SUPERSAMPLE = 2  # shapes are drawn this much larger, then downsampled, for smooth edges


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # a key of COLORS
    row: int  # grid cell, 0..2 from the top
    column: int  # 0..2 from the left
    size: float  # side (or diameter) in pixels
    center: tuple[float, float]  # (x, y) in pixels


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in reading order
    background: tuple[int, int, int]

    def find(self, kind: str) -> Shape | None:
        return next((s for s in self.shapes if s.kind == kind), None)


def random_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    """One to `max_shapes` (at most three) distinct shapes in distinct cells, with colours that stand out
    from the background."""
    if not 1 <= max_shapes <= len(SHAPES):
        raise ValueError(f"max_shapes={max_shapes}: a scene holds one to {len(SHAPES)} distinct shapes")
    count = int(rng.integers(1, max_shapes + 1))
    kinds = rng.choice(SHAPES, size=count, replace=False)
    cells = rng.choice(9, size=count, replace=False)
    # Backgrounds are light or dark tints; a shape's colour must differ clearly from it.
    background, names = _background(rng)
    shapes = []
    for kind, cell in zip(kinds, cells):
        row, column = divmod(int(cell), 3)
        size = float(rng.uniform(0.55, 0.9) * _CELL)
        slack = (_CELL - size) / 2
        center = tuple(float((i + 0.5) * _CELL + rng.uniform(-slack, slack) * 0.9) for i in (column, row))
        shapes.append(Shape(str(kind), str(rng.choice(names)), row, column, size, center))
    shapes.sort(key=lambda s: (s.row, s.column))
    return Scene(tuple(shapes), background)


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def free_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    """One to `max_shapes` distinct shapes anywhere in the picture, not only inside their grid cell: sides
    of 12% to 48% of the picture, none overlapping, each centre in a cell of its own (the cell that
    "where" and "what is in" name). Backgrounds and colours as in `random_scene`."""
    if not 1 <= max_shapes <= len(SHAPES):
        raise ValueError(f"max_shapes={max_shapes}: a scene holds one to {len(SHAPES)} distinct shapes")
    count = int(rng.integers(1, max_shapes + 1))
    kinds = rng.choice(SHAPES, size=count, replace=False)
    background, names = _background(rng)
    while True:  # rejection sampling: a few tries at most for three shapes
        shapes = []
        for kind in kinds:
            size = float(rng.uniform(0.12, 0.48) * SIZE)
            center = tuple(float(v) for v in rng.uniform(size / 2, SIZE - size / 2, size=2))
            row, column = (min(int(v // _CELL), 2) for v in (center[1], center[0]))
            shapes.append(Shape(str(kind), str(rng.choice(names)), row, column, size, center))
        cells = {(s.row, s.column) for s in shapes}
        apart = all(max(abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])) > (a.size + b.size) / 2 + 2
                    for i, a in enumerate(shapes) for b in shapes[i + 1:])
        if len(cells) == len(shapes) and apart:
            shapes.sort(key=lambda s: (s.row, s.column))
            return Scene(tuple(shapes), background)


def _background(rng: np.random.Generator) -> tuple[tuple[int, int, int], list[str]]:
    """A light or dark tint, and the colour names that differ clearly from it."""
    if rng.random() < 0.7:
        background = tuple(int(v) for v in rng.integers(175, 256, size=3))
    else:
        background = tuple(int(v) for v in rng.integers(0, 90, size=3))
    return background, [c for c in COLORS if _distance(COLORS[c], background) > 120]


def draw(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels (drawn at twice that and downsampled, for smooth
    edges, up to 256 pixels; larger ones are drawn at their size)."""
    big = size * _SUPERSAMPLE if size <= 256 else size
    scale = big / SIZE
    image = Image.new("RGB", (big, big), scene.background)
    pen = ImageDraw.Draw(image)
    for s in scene.shapes:
        x, y = (v * scale for v in s.center)
        r = s.size * scale / 2
        fill = COLORS[s.color]
        if s.kind == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s.kind == "square":
            pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:  # an upright equilateral-looking triangle inside the same box
            pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return image if big == size else image.resize((size, size), Image.Resampling.LANCZOS)


def place(row: int, column: int) -> str:
    """'top left', 'middle right', 'bottom center', ...; the middle cell is 'center'."""
    if (row, column) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLUMNS[column]}"


def where(shape: Shape) -> str:
    return place(shape.row, shape.column)


PLACES = tuple(place(*divmod(cell, 3)) for cell in range(9))  # reading order


def caption(scene: Scene) -> str:
    words = [_a(scene.shapes[0])]
    for before, s in zip(scene.shapes, scene.shapes[1:]):
        relation = "above" if s.row > before.row else "left of"
        words.append(f"{relation} {_a(s)}")
    return " ".join(words)


def prompts_for(scene: Scene) -> list[tuple[str, str]]:
    """Every (kind, prompt) that has an answer for this scene."""
    out = [("caption", "caption en"), ("count", "count shapes")]
    for s in scene.shapes:
        out += [("color", f"what color is the {s.kind}?"), ("where", f"where is the {s.kind}?")]
    out += [("what", f"what is in the {p}?") for p in PLACES]
    return out


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> str:
    """A prompt of `kind` about `scene`, picked at random among the ones it has an answer to. Most cells
    are empty, so half of the "what is in ...?" prompts ask about a cell with a shape in it."""
    choices = [p for k, p in prompts_for(scene) if k == kind]
    if kind == "what" and rng.random() < 0.5:
        choices = [p for p in choices if answer(scene, p) != "nothing"]
    return choices[int(rng.integers(len(choices)))]


def answer(scene: Scene, prompt: str) -> str:
    """The one right answer to `prompt` about `scene`."""
    if prompt == "caption en":
        return caption(scene)
    if prompt == "count shapes":
        return str(len(scene.shapes))
    for question, attribute in (("what color is the ", lambda s: s.color), ("where is the ", where)):
        if prompt.startswith(question) and prompt.endswith("?"):
            shape = scene.find(prompt[len(question):-1])
            if shape is None:
                raise ValueError(f"prompt {prompt!r}: the scene has no {prompt[len(question):-1]}")
            return attribute(shape)
    if prompt.startswith("what is in the ") and prompt.endswith("?"):
        cell = prompt[len("what is in the "):-1]
        if cell not in PLACES:
            raise ValueError(f"prompt {prompt!r}: {cell!r} is not a place on the grid ({', '.join(PLACES)})")
        shape = next((s for s in scene.shapes if where(s) == cell), None)
        return "nothing" if shape is None else _a(shape)
    raise ValueError(f"prompt {prompt!r} is not one the shapes task asks")


def examples(seed: int, count: int, kinds=PROMPT_KINDS) -> list[dict]:
    """`count` rows {"image", "prompt", "answer", "kind"}, each a fresh scene and one of its prompts of
    `kinds` (cycling through the kinds, so each is equally common)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        scene = random_scene(rng)
        prompt = ask(scene, kind, rng)
        rows.append({"image": draw(scene), "prompt": prompt, "answer": answer(scene, prompt), "kind": kind})
    return rows


def _a(shape: Shape) -> str:
    article = "an" if shape.color[0] in "aeiou" else "a"
    return f"{article} {shape.color} {shape.kind}"
