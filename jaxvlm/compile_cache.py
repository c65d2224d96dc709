"""The persistent compilation cache, on by default: compiled programs are kept on disk, so a second process
runs the same model without compiling it again.

`jaxvlm.load` and the `jaxvlm` command turn it on, under `$XDG_CACHE_HOME/jaxvlm` (else `~/.cache/jaxvlm`),
unless jax's own cache was configured already (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) or
`JAXVLM_COMPILATION_CACHE=0` (the command's `--no-compilation-cache`) turns it off. Programs that compile
in under `MIN_COMPILE_SECONDS` are not kept (they are cheaper to compile than to read back).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("jaxvlm")

ENV = "JAXVLM_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.1


def directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvlm", "xla")


def enable() -> str | None:
    """Turns the cache on (see the module docstring); returns its folder, or None where it stays off or
    jax's own setting is kept."""
    import jax
    if os.environ.get(ENV, "1").lower() in ("0", "false", "no", "off") or jax.config.jax_compilation_cache_dir:
        return None
    folder = directory()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a read-only home: run without it
        log.warning("the compilation cache is off: %s cannot be made (%s)", folder, e.strerror)
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder
