"""One process of a two-host job on localhost, each with 4 CPU devices: loads a converted model on a
(2, 4) mesh spanning both, generates, computes logits and trains a few steps, and writes what it saw as
JSON. Run by tests/test_sharding.py as `python -m tests.multihost_worker ID PORT FOLDER TOKENIZER_DIR PARAMS OUT`,
PARAMS the tiny training model's initial params, pickled (the test's own: initialising here would compile
the init program once more in each process)."""

import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()

import json  # noqa: E402
import pickle  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

PROMPTS = [[5, 9, 13, 17, 21], [40, 41, 42], [7, 7, 8, 9, 100, 101, 102], [3, 4]]
NEW_TOKENS = 8
TRAIN_STEPS = 3


def main(process_id: int, port: str, folder: str, tokenizer_dir: str, params: str, out: str) -> None:
    import jaxvlm
    from jaxvlm.train import Trainer, loss_curve
    from tests import tiny_training as tiny

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    model = jaxvlm.load(folder, mesh=mesh)
    ids, mask = left_pad(PROMPTS)
    tokens = model.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS)
    logits = model.logits(ids, mask)
    losses, record = loss_curve()
    trainer = Trainer(tiny.TINY, tiny.train_config(TRAIN_STEPS), None, mesh)
    with open(params, "rb") as f:
        initial = pickle.load(f)
    trainer.fit(initial, tiny.batches(tiny.tokenizer(tokenizer_dir), batch_size=4), progress=False,
                on_step=record)
    with open(out, "w") as f:
        json.dump({"devices": jax.device_count(), "local_devices": jax.local_device_count(),
                   "types": [type(tokens).__name__, type(logits).__name__], "tokens": tokens.tolist(),
                   "logits": logits.tolist(), "losses": losses}, f)
    jax.distributed.shutdown()


def left_pad(rows):
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, True
    return ids, mask


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:])
