"""Reading Hugging Face weight files one tensor at a time.

Supports `model.safetensors`, sharded `model-0000i-of-0000n.safetensors` with their
`model.safetensors.index.json`, and `pytorch_model.bin` (and its sharded index), the last through
`torch.load(weights_only=True, mmap=True)`, so nothing is unpickled but tensors and nothing is read twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import numpy as np


class CheckpointError(ValueError):
    pass


class TensorReader:
    """name -> (shape, loader) over every weight file of a checkpoint folder."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._stack = contextlib.ExitStack()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._loaders = {}
        self._bfloat16: set[str] = set()
        files = _weight_files(hf_dir)
        for path in files:
            if path.endswith(".safetensors"):
                self._add_safetensors(path)
            else:
                self._add_torch(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def is_bfloat16(self, name: str) -> bool:
        return name in self._bfloat16

    def get(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def _add_safetensors(self, path: str) -> None:
        from safetensors import SafetensorError, safe_open
        # The "flax" framework reads bfloat16, which the "numpy" one rejects; arrays stay on the host.
        try:
            f = self._stack.enter_context(safe_open(path, framework="flax", device="cpu"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        for name in f.keys():
            info = f.get_slice(name)
            self._shapes[name] = tuple(info.get_shape())
            if info.get_dtype() == "BF16":
                self._bfloat16.add(name)
            self._loaders[name] = _safetensors_loader(f, name, path)

    def _add_torch(self, path: str) -> None:
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from None
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # files from torch < 1.6 (not zip-based) cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt files
            raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
        for name, tensor in state.items():
            self._shapes[name] = tuple(tensor.shape)
            if tensor.dtype == torch.bfloat16:
                self._bfloat16.add(name)
            self._loaders[name] = lambda t=tensor: _torch_to_numpy(t)


def _safetensors_loader(f, name: str, path: str):
    def load():
        try:
            return np.asarray(f.get_tensor(name))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
    return load


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes' type
        import ml_dtypes
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _weight_files(hf_dir: str) -> list[str]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(hf_dir, index)):
            index_path = os.path.join(hf_dir, index)
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e})") from None
            files = [os.path.join(hf_dir, name) for name in dict.fromkeys(weight_map.values())]
            missing = [p for p in files if not os.path.isfile(p)]
            if missing:
                raise CheckpointError(f"{missing[0]}: shard listed in {index} is missing")
            return files
        if os.path.isfile(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
    raise CheckpointError(f"{hf_dir}: no weights (model.safetensors, its sharded index, or pytorch_model.bin)")

