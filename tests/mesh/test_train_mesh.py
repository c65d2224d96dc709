"""Training over a mesh: data parallel over `data`, FSDP over `fsdp`, tensor parallel over `model`; the
same losses and updated params as on one device, and checkpoints saved and restored in their shards."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxvlm.checkpoint import param_name
from jaxvlm.train import Trainer, loss_curve
from tests import tiny_training as tiny
from tests.mesh.test_mesh import MESHES

STEPS = 3


def close(state, want_state) -> None:
    """Params equal within float32 tolerance. Key biases are left out: softmax ignores a shift shared by
    every key, so their gradient is zero in exact arithmetic, and Adam divides the rounding noise left
    in its place by its own size (an update of +-lr whichever way the noise falls)."""
    want = {param_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(want_state.params)[0]}
    for path, got in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        name = param_name(path)
        if not name.endswith("attn/k/bias"):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want[name]), atol=1e-5, rtol=1e-5, err_msg=name)


def run(batches, mesh=None, workdir=None, steps=STEPS, **kwargs):
    losses, record = loss_curve()
    trainer = Trainer(tiny.TINY, tiny.train_config(steps, **kwargs), workdir, mesh)
    state = trainer.fit(tiny.init_params(), batches, progress=False, on_step=record)
    return state, losses


@pytest.fixture(scope="module")
def batches(tiny_tokenizer):
    return tiny.batches(tiny_tokenizer, batch_size=8)


@pytest.fixture(scope="module")
def one_device(batches):
    return run(batches)


def test_fsdp_training_equals_one_device(batches, one_device, tmp_path):
    state, losses = run(batches, jax.make_mesh(*MESHES["fsdp"]), tmp_path, checkpoint_every=2)
    want_state, want_losses = one_device
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    close(state, want_state)
    split = [x for x in jax.tree.leaves(state) if not x.sharding.is_fully_replicated]
    assert split, "params and moments should be split over fsdp and model"


def test_a_run_resumes_from_its_sharded_checkpoint(batches, one_device, tmp_path):
    mesh = jax.make_mesh(*MESHES["fsdp"])
    run(batches, mesh, tmp_path, steps=2, checkpoint_every=1)
    trainer = Trainer(tiny.TINY, tiny.train_config(STEPS), tmp_path, mesh)
    restored = trainer.restore(tiny.init_params())
    assert int(restored.step) == 2
    kernel = restored.params["decoder"]["layer_0"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
    trainer.close()
    state, losses = run(batches, mesh, tmp_path)
    np.testing.assert_allclose(losses, one_device[1], rtol=1e-5)  # steps 1-2 as recorded, then the new ones
    close(state, one_device[0])


def test_a_batch_the_mesh_does_not_divide_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="batch_size 4: the mesh splits each batch over 8 devices"):
        run(tiny.batches(tiny_tokenizer, batch_size=4), jax.make_mesh(*MESHES["8x1"]))


def test_finetune_trains_on_the_mesh_it_is_given(tiny_tokenizer, one_device):
    """finetune on a (2, 4) mesh (data and tensor parallel) takes the batches `one_device` took: the same
    losses and params, and the tuned model stays on the mesh."""
    from jaxvlm.model import Model
    from jaxvlm.train import finetune
    losses, record = loss_curve()
    tuned = finetune(Model(tiny.TINY, tiny.init_params(), tiny_tokenizer), tiny.rows(), tiny.train_config(STEPS),
                     batch_size=8, seed=0, progress=False, on_step=record, mesh=jax.make_mesh(*MESHES["2x4"]))
    np.testing.assert_allclose(losses, one_device[1], rtol=1e-5)
    close(tuned, one_device[0])
    assert tuned.shard is not None and tuned.shard.size == {"data": 2, "model": 4}
