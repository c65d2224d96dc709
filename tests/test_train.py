"""The train loop: optimizer schedule, mixed precision, resuming the same loss curve, a run killed
mid-save, non-finite losses and a checkpoint of another model shape."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import checkpoint
from jaxvlm.model import Model
from jaxvlm.train import Trainer, finetune, loss_curve
from tests import tiny_training as tiny


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return tiny_tokenizer_dir


def run(tok_dir, steps, workdir=None, params=None, batches=None, **kwargs):
    losses, record = loss_curve()
    state = Trainer(tiny.TINY, tiny.train_config(steps, **kwargs), workdir).fit(
        tiny.init_params() if params is None else params, batches or tiny.batches(tiny.tokenizer(tok_dir)),
        progress=False, on_step=record)
    return state, losses


@pytest.fixture(scope="module")
def straight(tok):
    """Eight steps without interruption: the reference loss curve."""
    return run(tok, 8)


def test_loss_falls_and_master_weights_stay_float32(tok):
    state, losses = run(tok, 30, compute_dtype="bfloat16")
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert int(state.step) == 30


def test_learning_rate_warms_up_then_decays(tok):
    rates = []
    Trainer(tiny.TINY, tiny.train_config(10, warmup_steps=4, learning_rate=1e-2, final_learning_rate=1e-4)).fit(
        tiny.init_params(), tiny.batches(tiny.tokenizer(tok)), progress=False,
        on_step=lambda s, m: rates.append(m["learning_rate"]))
    np.testing.assert_allclose(rates[:5], [0, 2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-5, atol=1e-9)
    assert all(a > b for a, b in zip(rates[4:], rates[5:])) and rates[-1] > 1e-4


def test_resumed_run_continues_the_same_loss_curve(tok, straight, tmp_path):
    """Stop after a checkpoint at step 4, start again: steps 5-8 repeat the uninterrupted run's losses."""
    _, want = straight

    class Stop(Exception):
        pass

    def stop_at_5(step, metrics):
        if step == 5:
            raise Stop
    with pytest.raises(Stop):
        Trainer(tiny.TINY, tiny.train_config(8, checkpoint_every=4), tmp_path).fit(
            tiny.init_params(), tiny.batches(tiny.tokenizer(tok)), progress=False, on_step=stop_at_5)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
    state, losses = run(tok, 8, workdir=tmp_path, checkpoint_every=4)
    assert int(state.step) == 8
    # steps 1-4 as recorded before the stop, then the new ones: the whole curve
    np.testing.assert_allclose(losses, want, rtol=1e-6)


def test_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(tok, straight, tmp_path):
    """A training process saving every step is killed (SIGKILL) while a checkpoint is being written;
    the unfinished one is never taken for a checkpoint, and the resumed run repeats the reference curve."""
    _, want = straight
    checkpoints = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "tests.tiny_training", str(tmp_path), tok, "400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    unfinished = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(checkpoints) if checkpoints.is_dir() else []
            unfinished = [n for n in names if "tmp" in n]
            if unfinished and any(n.isdigit() for n in names):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert unfinished, "the run was not caught while writing a checkpoint"
    complete = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert complete
    resumed_at = complete[-1]
    state, losses = run(tok, resumed_at + 3, workdir=tmp_path, checkpoint_every=1)
    assert not [n for n in os.listdir(checkpoints) if "tmp" in n], "leftovers of the killed save remain"
    assert int(state.step) == resumed_at + 3 and len(losses) == resumed_at + 3  # the recorded steps, and 3 new
    if resumed_at + 3 <= len(want):
        np.testing.assert_allclose(losses[resumed_at:], want[resumed_at:resumed_at + 3], rtol=1e-6)


def test_resume_from_another_model_shape_names_the_param(tok, straight, tmp_path):
    run(tok, 2, workdir=tmp_path)
    wider = dataclasses.replace(tiny.TINY, decoder=dataclasses.replace(tiny.TINY.decoder, mlp_dim=96))
    with pytest.raises(ValueError, match=r"checkpoints/2: param decoder/layer_0/mlp/down/kernel has shape "
                                         r"\(64, 32\) in the checkpoint but \(96, 32\) in this model"):
        # (params of the wider shape, zeros: the shape is refused before anything runs)
        zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), checkpoint.abstract_params(wider))
        Trainer(wider, tiny.train_config(4), tmp_path).fit(zeros, tiny.batches(tiny.tokenizer(tok), config=wider),
                                                          progress=False)


def poisoned(tok_dir, bad_steps):
    """The usual batches, with NaN pixels at `bad_steps` (0-based)."""
    good = tiny.batches(tiny.tokenizer(tok_dir))

    def batch(step):
        b = good(step)
        return dataclasses.replace(b, pixels=np.full_like(b.pixels, np.nan)) if step in bad_steps else b
    return batch


def test_a_nan_loss_skips_the_step_and_names_it(tok, straight, caplog):
    _, want = straight
    with caplog.at_level(logging.WARNING, "jaxvlm.train"):
        state, losses = run(tok, 4, batches=poisoned(tok, {1}))
    assert "step 2: loss nan" in caplog.text and "update skipped" in caplog.text
    assert np.isnan(losses[1]) and losses[0] == pytest.approx(want[0], rel=1e-6)
    assert np.isfinite(losses[2:]).all()
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(state.params))


def test_non_finite_losses_in_a_row_stop_the_run(tok, tmp_path):
    # Skipped steps leave the weights as they were, so the checkpoint at step 4 holds step 2's weights.
    with pytest.raises(FloatingPointError, match=r"steps 3-5: the loss was not finite 3 times in a row; stopping "
                                                 r"\(last checkpoint: .*checkpoints/4\)"):
        run(tok, 8, workdir=tmp_path, batches=poisoned(tok, {2, 3, 4}), max_bad_steps=3, checkpoint_every=2)


def test_finetune_a_text_model_leaves_the_original_untouched(tok):
    """Text-only rows (no image, plain prompts); the tuned model is new and the original keeps its weights."""
    config = dataclasses.replace(tiny.TINY, vision=None, image_processing=None, image_token_id=None, prefix_lm=False,
                                 position_offset=0, prompt_format="plain")
    params = {"decoder": tiny.init_params()["decoder"]}  # the text model's tree (its init, already compiled)
    assert jax.tree.structure(params) == jax.tree.structure(checkpoint.abstract_params(config))
    model = Model(config, params, tiny.tokenizer(tok))
    before = jax.tree.map(np.array, params)
    rows = [{"prompt": f"count shapes {i}", "answer": str(i % 3 + 1)} for i in range(12)]
    losses, record = loss_curve()
    tuned = finetune(model, rows, tiny.train_config(25), batch_size=4, progress=False, on_step=record)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    assert isinstance(tuned.generate("count shapes 4", max_new_tokens=2), str)


class Stop(Exception):
    pass


def stop_at(stop_step):
    def on_step(step, metrics):
        if step == stop_step:
            raise Stop
    return on_step


def test_a_workdir_run_saves_along_the_way_and_says_where_it_resumes(tok, tmp_path, capsys):
    """Without checkpoint_every, ten checkpoints over the run; a resumed run names its step and checkpoint."""
    with pytest.raises(Stop):
        Trainer(tiny.TINY, tiny.train_config(20, checkpoint_every=None), tmp_path).fit(
            tiny.init_params(), tiny.batches(tiny.tokenizer(tok)), progress=False, on_step=stop_at(7))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]  # every 2 steps, the last two kept
    capsys.readouterr()
    trainer = Trainer(tiny.TINY, tiny.train_config(20, checkpoint_every=None), tmp_path)
    state = trainer.fit(tiny.init_params(), tiny.batches(tiny.tokenizer(tok)), progress=True)
    assert f"resuming: step 6 of 20, from {tmp_path / 'checkpoints' / '6'}" in capsys.readouterr().err
    assert int(state.step) == 20 and [m["step"] for m in trainer.history] == list(range(1, 21))
    Trainer(tiny.TINY, tiny.train_config(20, checkpoint_every=None), tmp_path).fit(tiny.init_params(),
                                                                               tiny.batches(tiny.tokenizer(tok)))
    assert "the run is complete: step 20 of 20" in capsys.readouterr().err


def test_a_workdir_of_another_run_is_refused(tok, tmp_path):
    """A finished workdir re-run with other rows or settings is an error, never its old weights."""
    run(tok, 3, workdir=tmp_path)
    other_rows = tiny.RowBatches(tiny.TINY, tiny.tokenizer(tok), tiny.rows(seed=8), 4, seed=0)
    with pytest.raises(ValueError, match=r"holds a run of other settings \(the data\); resume it with the same"):
        run(tok, 3, workdir=tmp_path, batches=other_rows)
    with pytest.raises(ValueError, match=r"other settings \(learning_rate=0\.01 \(was 0\.003\)\)"):
        run(tok, 3, workdir=tmp_path, learning_rate=0.01)
    with pytest.raises(ValueError, match="holds a run at step 3, past steps=2; give another workdir"):
        run(tok, 2, workdir=tmp_path)
    state, losses = run(tok, 4, workdir=tmp_path)  # more steps: the run goes on
    assert int(state.step) == 4 and len(losses) == 4


def test_a_finetuned_model_saves_and_reloads(tok, tmp_path):
    import jaxvlm
    model = Model(tiny.TINY, tiny.init_params(), tiny.tokenizer(tok))
    tuned = finetune(model, tiny.rows(), tiny.train_config(2), batch_size=4, progress=False)
    folder = tuned.save(tmp_path / "tuned")
    assert sorted(os.listdir(folder)) == ["checksums.json", "config.json", "params", "tokenizer.model"]
    reloaded = jaxvlm.load(folder)
    ids = reloaded.encode("count shapes", image=tiny.rows()[0]["image"])
    np.testing.assert_array_equal(reloaded.logits(*ids), tuned.logits(*ids))
    with pytest.raises(ValueError, match="tuned: already exists; save into a new folder"):
        tuned.save(folder)
