"""The built-in model's world: synthetic scenes of shapes, the questions asked about them, and the
script that trains a small PaliGemma-architecture model on them (`python -m jaxvlm.shapes.train`)."""

from jaxvlm.shapes.scenes import (COLORS, PLACES, PROMPT_KINDS, SHAPES, Scene, Shape, answer, ask, draw, examples,
                                  prompts_for, random_scene)

__all__ = ["COLORS", "PLACES", "PROMPT_KINDS", "SHAPES", "Scene", "Shape", "answer", "ask", "draw", "examples",
           "prompts_for", "random_scene"]
