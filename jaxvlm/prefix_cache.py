"""Prefix caching: the keys and values of recent prompts, kept so that a prompt beginning with the same tokens
(a multi-turn chat, a shared system prompt, the same image asked about again) runs only its new end.

A causal layer's keys and values at a token depend on that token and the ones before it only, so a new
prompt that shares its first m tokens with a kept one may take their keys and values as they are
(`generate.prefill_after`). What breaks that is a bidirectional block reaching past the shared part (a
prefix-LM's prefix: PaliGemma's prompts are never reused) and images: image placeholders are the same token
whatever the image, so the shared part counts image tokens only where the images are the same ones.

Entries are whole one-row caches from prefill (every layer full length), evicted least recently used
first once their bytes pass the budget.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import jax
import numpy as np

from jaxvlm.kv_cache import KVCache
from jaxvlm.patches import PatchImages


@dataclasses.dataclass
class Entry:
    tokens: np.ndarray  # int32[n]: the prompt
    images: str | None  # a digest of its images' pixels; None without images
    cache: KVCache  # one row, full-length layers
    first: int  # the sequence slot of the prompt's first token in `cache`
    nbytes: int


def images_digest(pixels: np.ndarray | PatchImages | None) -> str | None:
    if pixels is None:
        return None
    arrays = [pixels.values, pixels.grids] if isinstance(pixels, PatchImages) else [pixels]
    digest = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(a.tobytes() + str(a.shape).encode())
    return digest.hexdigest()


def position_shift(pixels: np.ndarray | PatchImages | None, config) -> int:
    """How far past its token count a prompt with these images numbers the text after them: M-RoPE
    advances by an image's longer side (in merged patches), not by its tokens; 0 for any other model."""
    if not isinstance(pixels, PatchImages):
        return 0
    merged = pixels.grids[:, 1:] // config.vision.merge_size
    return int((merged.max(axis=1) - merged.prod(axis=1)).sum())


class PrefixCache:
    """Prompts' caches, at most `max_bytes` of them; `hits` counts the prompts that reused one, `reused` the
    tokens they did not run again."""

    def __init__(self, max_bytes: int, image_token: int | None):
        self.max_bytes, self.image_token = max_bytes, image_token
        self.entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()  # oldest use first
        self.nbytes = self.hits = self.reused = 0

    def longest(self, tokens: np.ndarray, images: str | None) -> tuple[Entry | None, int]:
        """The kept entry sharing the most first tokens with `tokens` (image tokens count only under the
        same images), and how many it shares: at most all but the last (whose logits are wanted)."""
        best, shared = None, 0
        for entry in self.entries.values():
            n = min(len(entry.tokens), len(tokens) - 1)
            differs = np.flatnonzero(entry.tokens[:n] != tokens[:n])
            common = int(differs[0]) if len(differs) else n
            if images != entry.images and self.image_token is not None:
                is_image = np.flatnonzero(tokens[:common] == self.image_token)
                common = int(is_image[0]) if len(is_image) else common
            if common > shared:
                best, shared = entry, common
        return best, shared

    def use(self, entry: Entry, reused: int) -> None:
        self.entries.move_to_end(self._key(entry.tokens, entry.images))
        self.hits += 1
        self.reused += reused

    def add(self, tokens: np.ndarray, images: str | None, cache: KVCache, first: int) -> None:
        """Keeps a prompt's cache, evicting the least recently used past the budget (one larger than the
        whole budget is not kept)."""
        key = self._key(tokens, images)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        nbytes = sum(x.nbytes for x in jax.tree.leaves(cache))
        if nbytes > self.max_bytes:
            return
        while self.nbytes + nbytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self.entries[key] = Entry(np.array(tokens), images, cache, first, nbytes)
        self.nbytes += nbytes

    @staticmethod
    def _key(tokens: np.ndarray, images: str | None) -> tuple:
        return (np.asarray(tokens, np.int32).tobytes(), images)
