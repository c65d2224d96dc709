"""jaxvlm: vision-language and text decoder models in JAX."""

import glob as _glob
import os as _os

# libtpu (the tpu-compile extra, for `jaxvlm compile-report`) makes jax try a TPU at start-up; on a machine
# with none (no TPU device files) these settings keep it from printing its errors before jax goes on
# without it. Set before jax is imported, and only where unset.
if not _glob.glob("/dev/accel*") and not _glob.glob("/dev/vfio/[0-9]*"):
    for _name, _value in (("TPU_ACCELERATOR_TYPE", "v5litepod-1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                          ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        _os.environ.setdefault(_name, _value)

from jaxvlm.config import DecoderConfig, ImageProcessing, ModelConfig, RopeConfig, TokensConfig, VisionConfig

__all__ = ["DecoderConfig", "ImageProcessing", "ModelConfig", "Model", "RopeConfig", "TokensConfig", "VisionConfig",
           "load"]


def __getattr__(name):
    # The model (and jax with it) is imported on first use, so that the `jaxvlm` command starts at once and
    # a Ctrl-C while jax loads is the command's to report.
    if name in ("Model", "load"):
        from jaxvlm import model
        return getattr(model, name)
    raise AttributeError(f"module 'jaxvlm' has no attribute {name!r}")
