"""Exact-match accuracy of a model on fresh scenes: `python -m jaxvlm.shapes.evaluate [--checkpoint DIR]`."""

from __future__ import annotations

import argparse

import numpy as np

from jaxvlm.shapes import scenes

EVAL_SEED = 1234  # never used in training (which draws from seed 0)


def questions(seed: int = EVAL_SEED, count: int = 200, wider: bool = False) -> list[dict]:
    """`count` fresh scenes, each asked one prompt of every kind (colour and place of a random shape in it):
    grid scenes at 128 pixels, or with `wider` free scenes (`scenes.free_scene`) drawn at 64 to 512 pixels."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        if wider:
            scene = scenes.free_scene(rng)
            image = scenes.draw(scene, int(rng.integers(64, 513)))
        else:
            scene = scenes.random_scene(rng)
            image = scenes.draw(scene)
        for kind in scenes.PROMPT_KINDS:
            prompt = scenes.ask(scene, kind, rng)
            rows.append({"image": image, "prompt": prompt, "answer": scenes.answer(scene, prompt), "kind": kind})
    return rows


def exact_match(model, rows: list[dict], batch_size: int = 64) -> dict[str, float]:
    """Fraction of rows answered exactly right (greedy), per prompt kind."""
    right: dict[str, list[bool]] = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        answers = model.generate([r["prompt"] for r in chunk], image=[r["image"] for r in chunk],
                                 max_new_tokens=24)
        for r, a in zip(chunk, answers):
            right.setdefault(r["kind"], []).append(a == r["answer"])
    return {kind: float(np.mean(v)) for kind, v in right.items()}


def main(argv=None) -> None:
    import jaxvlm
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=None, help="a model folder (default: the built-in model)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    args = parser.parse_args(argv)
    model = jaxvlm.load(args.checkpoint)
    grid = exact_match(model, questions(args.seed, args.scenes))
    wider = exact_match(model, questions(args.seed, args.scenes, wider=True))
    print(f"{'prompt':8s} {'grid scenes':>12s} {'wider scenes':>13s}")
    for kind in grid:
        print(f"{kind:8s} {grid[kind]:12.1%} {wider[kind]:13.1%}")


if __name__ == "__main__":
    main()
