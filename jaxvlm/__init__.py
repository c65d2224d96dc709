"""jaxvlm: vision-language and text decoder models in JAX."""

import glob as _glob
import os as _os

# libtpu (the tpu-compile extra, for `jaxvlm compile-report`) makes jax try a TPU at start-up; on a machine
# with none (no TPU device files) these settings keep it from printing its errors before jax goes on
# without it, and from leaving two log files in /tmp/tpu_logs for every process (thousands after a few
# test runs). Set before jax is imported, and only where unset.
if not _glob.glob("/dev/accel*") and not _glob.glob("/dev/vfio/[0-9]*"):
    for _name, _value in (("TPU_ACCELERATOR_TYPE", "v5litepod-1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                          ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                          ("TPU_LOG_DIR", "disabled")):
        _os.environ.setdefault(_name, _value)

__all__ = ["DecoderConfig", "ImageProcessing", "ModelConfig", "Model", "RopeConfig", "TokensConfig", "VisionConfig",
           "load"]


def __getattr__(name):
    # Everything is imported on first use (numpy and jax with it), so that the `jaxvlm` command installs its
    # Ctrl-C handler at once: an interruption while they load is the command's to report, in one line.
    if name in ("Model", "load"):
        from jaxvlm import model
        return getattr(model, name)
    if name in __all__:
        from jaxvlm import config
        return getattr(config, name)
    raise AttributeError(f"module 'jaxvlm' has no attribute {name!r}")


def __dir__():
    # the names loaded on first use, which the module's own namespace holds none of until then
    return sorted(set(globals()) | set(__all__))
