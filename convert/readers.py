"""Reading Hugging Face weight files one tensor at a time.

Supports `model.safetensors`, sharded `model-0000i-of-0000n.safetensors` with their
`model.safetensors.index.json`, and `pytorch_model.bin` (and its sharded index), the last through
`torch.load(weights_only=True, mmap=True)`, so nothing is unpickled but tensors and nothing is read twice.

Only files inside the checkpoint folder are opened: an index entry naming `../x` or a link that resolves
elsewhere is refused. With an index, each tensor is read from the shard the index names; a tensor found in
a shard the index does not list is refused, as is a `.bin` that is anything but a flat mapping of names to
dense tensors. Each tensor's dtype is reported as stored, so the converter can refuse what is not a float.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from jaxvlm import files

# Stored dtypes a weight may have (safetensors' spelling -> numpy's name); anything else is refused.
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
OTHER_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class CheckpointError(ValueError):
    pass


class TensorReader:
    """name -> (shape, dtype, loader) over every weight file of a checkpoint folder."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._stack = contextlib.ExitStack()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._loaders = {}
        self._where: dict[str, str] = {}
        shards, self._index, self._index_path = _weight_files(hf_dir)
        for path in shards:
            if path.endswith(".safetensors"):
                self._add_safetensors(path)
            else:
                self._add_torch(path)
        if self._index is not None:
            absent = [n for n in self._index if n not in self._shapes]
            if absent:
                name = absent[0]
                raise CheckpointError(f"{self._index_path}: tensor {name!r} is listed in "
                                      f"{self._index[name]!r}, which does not hold it")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The stored dtype: 'float32', 'bfloat16', 'float16', 'float64', or another name (e.g. 'int8')."""
        return self._dtypes[name]

    def file(self, name: str) -> str:
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def _register(self, name: str, path: str, shape, dtype: str, loader) -> None:
        """Keeps the copy of `name` in the shard the index names; refuses a tensor the index does not list."""
        if self._index is not None:
            listed = self._index.get(name)
            if listed is None:
                raise CheckpointError(f"{path}: tensor {name!r} is not listed in {self._index_path}")
            if os.path.normpath(os.path.join(self.hf_dir, listed)) != os.path.normpath(path):
                return  # another shard's copy: the index names that one
        elif name in self._shapes:
            raise CheckpointError(f"{path}: tensor {name!r} is also in {self._where[name]}")
        self._shapes[name], self._dtypes[name], self._loaders[name], self._where[name] = \
            tuple(shape), dtype, loader, path

    def _add_safetensors(self, path: str) -> None:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    info = f.get_slice(name)
                    stored = info.get_dtype()
                    dtype = FLOAT_DTYPES.get(stored) or OTHER_DTYPES.get(stored, stored.lower())
                    self._register(name, path, info.get_shape(), dtype, _safetensors_loader(name, path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None

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
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors, got a "
                                  f"{type(state).__name__}")
        for name, tensor in state.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{path}: entry {name!r} is not named by a string")
            if not isinstance(tensor, torch.Tensor):
                kind = "a nested mapping" if isinstance(tensor, dict) else f"of type {type(tensor).__name__}"
                raise CheckpointError(f"{path}: entry {name!r} is {kind}, not a tensor; expected a flat "
                                      "mapping of names to tensors")
            if tensor.layout != torch.strided or tensor.is_quantized:
                raise CheckpointError(f"{path}: tensor {name!r} is not a dense tensor ({tensor.layout}"
                                      f"{', quantized' if tensor.is_quantized else ''})")
            dtype = str(tensor.dtype).removeprefix("torch.")
            self._register(name, path, tensor.shape, dtype, lambda t=tensor: _torch_to_numpy(t))


def _safetensors_loader(name: str, path: str):
    """Reads one tensor, opening the file for it: closing it unmaps the pages read, which would otherwise
    stay in the process's resident memory until the whole checkpoint had been read."""
    def load():
        from safetensors import safe_open
        try:
            with safe_open(path, framework="numpy") as f:  # bfloat16 as ml_dtypes' type
                return f.get_tensor(name)  # a copy, which outlives the file's mapping
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
    return load


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes' type
        import ml_dtypes
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _read_index(hf_dir: str, name: str) -> tuple[dict[str, str], str]:
    """The index's weight_map {tensor: shard}, every entry checked to be a file inside the folder."""
    path = files.inside(hf_dir, name)
    index = files.read_json(path, "an index object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: field 'weight_map' must be an object of tensor names to files, "
                              f"got {weight_map!r}"[:300])
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{path}: weight_map[{tensor!r}] must be a file name, got {shard!r}")
        files.inside(hf_dir, shard, f"{path}: weight_map[{tensor!r}]")
    return weight_map, path


# (one file, an index of shards) as transformers names them, the first found is read
WEIGHT_FILE_PAIRS = (("model.safetensors", "model.safetensors.index.json"),
                     ("pytorch_model.bin", "pytorch_model.bin.index.json"))
WEIGHT_FILES = tuple(name for pair in WEIGHT_FILE_PAIRS for name in pair)


def _weight_files(hf_dir: str) -> tuple[list[str], dict[str, str] | None, str | None]:
    """(the weight files, the index's weight_map or None, the index's path or None)."""
    for single, index in WEIGHT_FILE_PAIRS:
        if os.path.lexists(os.path.join(hf_dir, index)):
            weight_map, index_path = _read_index(hf_dir, index)
            shards = [os.path.join(hf_dir, name) for name in dict.fromkeys(weight_map.values())]
            missing = [p for p in shards if not os.path.isfile(p)]
            if missing:
                raise CheckpointError(f"{missing[0]}: shard listed in {index} is missing")
            return shards, weight_map, index_path
        if os.path.lexists(os.path.join(hf_dir, single)):
            return [files.inside(hf_dir, single)], None, None
    raise CheckpointError(f"{hf_dir}: no weights (model.safetensors, its sharded index, or pytorch_model.bin)")
