"""Training and fine-tuning: next-token loss on the answer, AdamW with warm-up and cosine decay, gradient
clipping, bfloat16 compute over float32 master weights, optional per-layer rematerialisation, and orbax
checkpoints that a run resumes from.

    trainer = Trainer(config, TrainConfig(steps=1000), workdir="runs/shapes")
    state = trainer.fit(params, batches)          # batches(step) -> data.Batch; resumes from workdir
    jaxvlm.Model(config, state.params, tokenizer).save("my-model")   # or: finetune(model, rows, tc).save(...)

A resumed run continues the same loss curve: the state (step, params, optimizer moments) is restored
exactly, and batches are a function of the step. A step whose loss or gradient is not finite is skipped
(the weights and moments stay as they were) with a warning naming the step; `max_bad_steps` in a row stop
the run. Checkpoints are written by orbax into a temporary folder renamed when complete, so a run killed
mid-save resumes from the last complete one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from tqdm import tqdm

from jaxvlm import checks, files
from jaxvlm import lora as lora_lib
from jaxvlm.checkpoint import all_finite, compare_trees, contracted_axes, param_axes
from jaxvlm.config import LoraConfig, ModelConfig
from jaxvlm.data import Batch, RowBatches
from jaxvlm.layout import is_stacked
from jaxvlm.losses import next_token_loss
from jaxvlm.inputs import Inputs
from jaxvlm.model import Model
from jaxvlm.sharding import Rules, mesh_rules, place
from jaxvlm.vlm import VisionLanguageModel

log = logging.getLogger("jaxvlm.train")

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CHECKPOINTS_DIR = "checkpoints"
RUN_FILE = "run.json"  # what a workdir's run trains: settings, model and data, checked when it resumes
LOCK_FILE = ".lock"  # held while a run trains in the workdir
HISTORY_FILE = "history.jsonl"  # each step's metrics, up to the latest checkpoint
# Settings that change how a run is kept, not what it computes: a resumed run may change them (and `steps`,
# to extend a run).
BOOKKEEPING = ("steps", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "remat")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    learning_rate: float = 1e-3  # the peak, reached after the warm-up
    warmup_steps: int = 0  # linear warm-up from 0, then cosine decay to final_learning_rate at `steps`
    final_learning_rate: float = 0.0
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only: not on norms, biases or vectors
    b1: float = 0.9
    b2: float = 0.999
    grad_clip_norm: float | None = 1.0  # clip the global gradient norm to this
    compute_dtype: str = "bfloat16"  # activations and matmuls; params and optimizer state stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)
    checkpoint_every: int | None = None  # steps between checkpoints (with a workdir); None: ten over the run.
    # The last step is always saved.
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # non-finite losses in a row before the run stops

    def __post_init__(self):
        name = lambda field: f"TrainConfig.{field}"
        for field in ("steps", "keep_checkpoints", "max_bad_steps"):
            checks.integer(name(field), getattr(self, field), 1)
        checks.integer(name("warmup_steps"), self.warmup_steps, 0, self.steps)
        for field in ("learning_rate", "final_learning_rate", "weight_decay"):
            checks.number(name(field), getattr(self, field), low=0)
        for field in ("b1", "b2"):  # Adam's moment decays: 1 would never forget, past it diverges
            checks.number(name(field), getattr(self, field), low=0, high=1, high_open=True)
        checks.optional_number(name("grad_clip_norm"), self.grad_clip_norm, low=0, low_open=True)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"TrainConfig.compute_dtype: must be one of {sorted(COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        checks.flag(name("remat"), self.remat)
        checks.optional_integer(name("checkpoint_every"), self.checkpoint_every, 1)

    @property
    def save_every(self) -> int:
        return self.checkpoint_every or max(1, self.steps // 10)

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, self.warmup_steps,
                                                  max(self.steps, self.warmup_steps + 1), self.final_learning_rate)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW (weight decay on matrices only) after gradient clipping, less its last stage: the scaling by
    minus the learning rate, which the train step applies with the schedule's value it is given. So the
    compiled step holds no schedule (steps, peak, warm-up): one program serves every run of a model."""
    matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.chain(optax.scale_by_adam(b1=tc.b1, b2=tc.b2), optax.add_decayed_weights(tc.weight_decay, matrices))
    if tc.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), adamw)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32[]: batches consumed
    params: Any  # float32 master weights
    opt_state: Any


def _batch_arrays(batch: Batch, config: ModelConfig) -> dict[str, Any]:
    arrays = {"tokens": batch.tokens, "valid": batch.valid, "loss_mask": batch.loss_mask & batch.valid}
    if config.prefix_lm:
        arrays["prefix"] = batch.prefix & batch.valid
    if batch.pixels is not None:
        arrays["pixels"] = batch.pixels
    return arrays


def loss_fn(model: VisionLanguageModel, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(mean next-token loss over the answer tokens, their count) for one batch of `_batch_arrays`."""
    inputs = Inputs.build(model.config, batch["tokens"], batch["valid"], batch.get("prefix"), batch.get("pixels"))
    logits = model.apply({"params": params}, inputs).logits
    return next_token_loss(logits, batch["tokens"], batch["loss_mask"])


def _train_step(model, optimizer, lora_scale, state: TrainState, batch, frozen,
                learning_rate) -> tuple[TrainState, dict[str, jax.Array]]:
    def loss(trained):
        # With LoRA the trained params are the adapters, attached to the frozen base params for the forward.
        params = trained if frozen is None else lora_lib.attach(frozen, lora_lib.scaled(trained, lora_scale))
        return loss_fn(model, params, batch)
    (loss, tokens), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)  # AdamW's last stage (see make_optimizer)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss, gradient or update leaves weights and moments untouched; the host reports the
    # step. So no non-finite weight is ever trained in, or saved.
    weights_finite = all_finite(params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & weights_finite
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    state = TrainState(step=state.step + 1, params=keep(params, state.params),
                       opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "finite": finite,
               "weights_finite": weights_finite,
               "learning_rate": learning_rate}
    return state, metrics


class Trainer:
    """Trains a model's params on batches; checkpoints to and resumes from `workdir` when one is given."""

    def __init__(self, config: ModelConfig, tc: TrainConfig, workdir: str | os.PathLike | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None, frozen=None):
        """With `mesh`, params and optimizer state are split over it as `jaxvlm.sharding`'s rules say
        (FSDP over `fsdp`, tensor parallel over `model`) and each batch over `data` and `fsdp`.

        A config with `lora` trains LoRA adapters alone (see `jaxvlm.lora`): `fit` takes the adapters, and
        `frozen` holds the base params they are attached to, which stay as they are (no gradient, no
        optimizer state, not checkpointed)."""
        if (config.lora is None) != (frozen is None):
            raise ValueError("a config with lora trains adapters over frozen base params: give both, or neither")
        if frozen is not None and mesh is not None:
            raise ValueError("LoRA training runs on one device for now; load the model without mesh=")
        if config.decoder is None:
            raise ValueError("training needs a decoder; this model is an image encoder alone")
        if config.head is not None:
            raise ValueError(f"this model has a {config.head.kind} head; the trainer trains language-model heads")
        if config.quantization is not None:
            raise ValueError("this model's weights are int8 (quantized for inference); train the float checkpoint "
                             "and quantize the result")
        self.config, self.tc = config, tc
        self.workdir = None if workdir is None else os.path.abspath(os.fspath(workdir))
        self.shard = mesh_rules(mesh, rules)
        self.model = VisionLanguageModel(config, COMPUTE_DTYPES[tc.compute_dtype], tc.remat)
        self.optimizer = make_optimizer(tc)
        self.frozen = frozen
        self._manager = None
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet
        self._resumed_from: tuple[str, int] | None = None  # (checkpoint, step) that `restore` took
        self._history: list[dict[str, float]] = []  # {"step", "loss", ...} of every step so far

    # --- state and checkpoints -----------------------------------------------------------------------------
    def init_state(self, params) -> TrainState:
        """A fresh state from `params` (a copy: the train step donates its state, which must not take the
        caller's arrays with it), laid out on the mesh if there is one."""
        def fresh(params):
            params = jax.tree.map(lambda p: jnp.array(p, jnp.float32), params)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))
        if self.shard is None:
            # Committed to the device, as restored arrays are: a fresh and a resumed state are then one
            # program to the train step (XLA compiles uncommitted and committed inputs as two).
            return jax.jit(fresh, out_shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))(params)
        devices = set(self.shard.mesh.devices.flat)
        # Params already on the mesh stay where they are; any others come from the host (the same on every
        # process), each process placing its own shards.
        params = jax.tree.map(lambda p: p if isinstance(p, jax.Array) and p.sharding.device_set == devices
                              else np.asarray(p), params)
        return jax.jit(fresh, out_shardings=self.state_shardings(params))(params)

    def state_shardings(self, params) -> TrainState:
        """Where each part of the state lives: params by their axes' names, the optimizer's moments as
        their params, step counts everywhere."""
        shard = self.shard
        shapes = jax.eval_shape(lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p), params)
        param_shardings = shard.params(param_axes(self.config, is_stacked(params)), shapes)
        opt_state = jax.eval_shape(self.optimizer.init, shapes)
        opt_shardings = optax.tree_map_params(self.optimizer, lambda _, s: s, opt_state, param_shardings,
                                              transform_non_params=lambda _: shard.replicated)
        return TrainState(step=shard.replicated, params=param_shardings, opt_state=opt_shardings)

    def compile_step(self, state: TrainState):
        # The layers run as the params hold them: unrolled, or stacked and scanned (see jaxvlm.layout).
        self.model = self.model.clone(scan_layers=is_stacked(state.params))
        scale = None if self.config.lora is None else self.config.lora.scale
        step = functools.partial(_train_step, self.model, self.optimizer, scale)
        if self.shard is None:
            return jax.jit(step, donate_argnums=0)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        return jax.jit(step, out_shardings=(shardings, self.shard.replicated), donate_argnums=0)

    def _place_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.shard is None:
            return batch
        rows, multiple = len(batch["tokens"]), self.shard.batch_multiple
        if rows % multiple:
            raise ValueError(f"batch_size {rows}: the mesh splits each batch over {multiple} devices (its data and "
                             f"fsdp axes); give a multiple of {multiple}")
        return {name: place(self.shard, x) for name, x in batch.items()}

    def manager(self) -> ocp.CheckpointManager | None:
        if self.workdir is not None and self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.tc.keep_checkpoints, create=True,
                                                   cleanup_tmp_directories=True)
            self._manager = ocp.CheckpointManager(os.path.join(self.workdir, CHECKPOINTS_DIR), options=options,
                                                  item_handlers=ocp.StandardCheckpointHandler())
        return self._manager

    def save(self, state: TrainState) -> None:
        manager = self.manager()
        step = int(state.step)
        if manager is not None and step not in manager.all_steps():
            if not all_finite(state.params):  # the train step keeps weights finite; this is the last guard
                raise FloatingPointError(f"step {step}: the weights are not finite; not saved over the "
                                         f"checkpoints in {manager.directory}")
            self._seal()
            manager.save(step, args=ocp.args.StandardSave(state))
            self._unsealed.append(step)
            if jax.process_index() == 0:
                files.write_atomically(os.path.join(self.workdir, HISTORY_FILE), "".join(
                    json.dumps(m) + "\n" for m in self._history if m["step"] <= step))

    def _seal(self) -> None:
        """Writes `checksums.json` into each finished checkpoint that has none yet, so flipped bytes are
        found at resume. orbax saves in the background: a checkpoint is sealed when the next one starts,
        or when the trainer closes (one killed before that resumes unverified)."""
        if self._manager is None or not self._unsealed:
            return
        self._manager.wait_until_finished()
        for step in self._unsealed:
            folder = os.path.join(self._manager.directory, str(step))
            # One process writes them (every host shares the checkpoint folder).
            if jax.process_index() == 0 and os.path.isdir(folder):  # unless max_to_keep has rotated it out
                files.write_checksums(folder)
        self._unsealed = []

    def restore(self, params) -> TrainState:
        """The latest usable checkpoint in `workdir` if there is one (checked against `params`' shapes),
        else a fresh state from `params`. A damaged checkpoint (unreadable, or with non-finite weights) is
        passed over with a warning naming it, for the one before it."""
        state = self.init_state(params)
        manager = self.manager()
        steps = [] if manager is None else sorted(manager.all_steps(), reverse=True)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        for step in steps:
            where = os.path.join(manager.directory, str(step))
            try:
                saved = manager.item_metadata(step)
                saved = getattr(saved, "tree", saved)["params"]  # orbax's TreeMetadata wraps the saved dict
            except Exception as e:
                log.warning("%s: damaged checkpoint (%s); trying the one before", where, files.error_line(e))
                continue
            if is_stacked(saved) != is_stacked(state.params):
                held = lambda stacked: "stacked (scan_layers=True)" if stacked else "unrolled (scan_layers=False)"
                raise ValueError(f"scan_layers: {where} holds the layers {held(is_stacked(saved))} but these params "
                                 f"are {held(is_stacked(state.params))}; load the model with the checkpoint's layout "
                                 "to resume")
            compare_trees(saved, state.params, where, "this model (it was saved from a model of another shape)")
            try:
                files.verify_checksums(where)
                restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:
                log.warning("%s: damaged checkpoint (%s); trying the one before", where, files.error_line(e))
                continue
            if not all_finite(restored.params):
                log.warning("%s: the saved weights are not finite; trying the one before", where)
                continue
            self._resumed_from = (where, step)
            return restored
        if steps:
            raise ValueError(f"{manager.directory}: no checkpoint there can be restored (steps "
                             f"{', '.join(map(str, steps))}; see the warnings); move the folder away to start afresh")
        return state

    def _check_run(self, batches: Callable[[int], Batch]) -> None:
        """Records what this workdir's run trains (settings, model, first batch) when it starts, and refuses
        to resume a run of other ones: their checkpoints would be returned as if trained on these."""
        if self.workdir is None:
            return
        path = os.path.join(self.workdir, RUN_FILE)
        if not os.path.exists(path) and self._resumed_from is not None:
            raise ValueError(f"{self.workdir}: holds checkpoints but no {RUN_FILE}, so what they were trained on "
                             "cannot be checked against these settings; not resumed. Restore the file, or move the "
                             "folder away to start afresh")
        settings = {k: v for k, v in dataclasses.asdict(self.tc).items() if k not in BOOKKEEPING}
        record = {"settings": settings, "model": _digest(self.config.to_json().encode()),
                  "data": _digest(*(np.asarray(a).tobytes() for a in dataclasses.astuple(batches(0)) if a is not None))}
        if os.path.exists(path):
            saved = files.read_json(path)
            changed = [f"{k}={v!r} (was {saved.get('settings', {}).get(k)!r})" for k, v in settings.items()
                       if saved.get("settings", {}).get(k) != v]
            changed += [f"the {what}" for what in ("model", "data") if saved.get(what) != record[what]]
            if changed:
                raise ValueError(f"{self.workdir}: holds a run of other settings ({', '.join(changed)}); resume it "
                                 "with the same ones, or give another workdir")
        elif jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            files.write_atomically(path, json.dumps(record, indent=1) + "\n")

    def _read_history(self, step: int) -> list[dict[str, float]]:
        """The recorded metrics of steps 1..`step` (a history that ran past the checkpoint is cut there)."""
        path = None if self.workdir is None else os.path.join(self.workdir, HISTORY_FILE)
        if step == 0 or path is None or not os.path.exists(path):
            return []
        history = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return [m for m in history if isinstance(m, dict) and isinstance(m.get("step"), int) and m["step"] <= step]

    @property
    def history(self) -> list[dict[str, float]]:
        """Each step's metrics ({"step", "loss", "learning_rate", ...}), resumed runs' earlier steps included."""
        return list(self._history)

    def close(self) -> None:
        if self._manager is not None:
            self._seal()
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    # --- the loop ------------------------------------------------------------------------------------------
    def fit(self, params, batches: Callable[[int], Batch], progress: bool = True,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainState:
        """Runs to `tc.steps` from the latest checkpoint (or from `params`); returns the final state.

        `batches(step)` gives batch `step` (0-based). `on_step(step, metrics)` sees each step's metrics
        (step counted from 1), e.g. to record the loss curve.
        """
        if self.workdir is None or jax.process_index() != 0:
            return self._fit(params, batches, progress, on_step)
        # one run at a time in a workdir (the first process of a job of several holds it for the job)
        with files.exclusive(os.path.join(self.workdir, LOCK_FILE), f"the workdir {self.workdir}"):
            return self._fit(params, batches, progress, on_step)

    def _fit(self, params, batches, progress, on_step) -> TrainState:
        bar = None
        try:
            state = self.restore(params)  # first: a checkpoint of another shape is named to the param
            self._check_run(batches)
            train_step = self.compile_step(state)
            start = int(state.step)
            if start > self.tc.steps:
                raise ValueError(f"{self.workdir}: holds a run at step {start}, past steps={self.tc.steps}; give "
                                 "another workdir")
            self._history = self._read_history(start)
            if self._resumed_from is not None:
                where, step = self._resumed_from
                done = "the run is complete" if step == self.tc.steps else "resuming"
                message = f"{done}: step {step} of {self.tc.steps}, from {where}"
                log.info(message)
                if progress:
                    print(message, file=sys.stderr, flush=True)
            if on_step is not None:  # the steps before the resumed one, as they were recorded
                for metrics in self._history:
                    on_step(metrics["step"], metrics)
            # jitted, as it ran inside the step before: eager evaluation rounds some values an ulp apart
            schedule = jax.jit(self.tc.schedule())
            bar = tqdm(total=self.tc.steps, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
            bad_in_a_row = 0
            # The next batch is made on a thread while the device runs the current step.
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                upcoming = pool.submit(batches, start) if start < self.tc.steps else None
                for step in range(start, self.tc.steps):
                    batch = self._place_batch(_batch_arrays(upcoming.result(), self.config))
                    if step + 1 < self.tc.steps:
                        upcoming = pool.submit(batches, step + 1)
                    state, metrics = train_step(state, batch, self.frozen, np.float32(schedule(step)))
                    metrics = {k: float(v) for k, v in metrics.items()}
                    if metrics["finite"]:
                        bad_in_a_row = 0
                    else:
                        bad_in_a_row += 1
                        log.warning("step %d: loss %s, gradient norm %s%s; update skipped", step + 1,
                                    metrics["loss"], metrics["grad_norm"],
                                    "" if metrics["weights_finite"] else ", updated weights not finite")
                        if bad_in_a_row >= self.tc.max_bad_steps:
                            raise FloatingPointError(
                                f"steps {step + 2 - bad_in_a_row}-{step + 1}: the loss was not finite "
                                f"{bad_in_a_row} times in a row; stopping (last checkpoint: {self._latest()})")
                    self._history.append({"step": step + 1, **metrics})
                    if on_step is not None:
                        on_step(step + 1, metrics)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
                    if (step + 1) % self.tc.save_every == 0:
                        self.save(state)
            bar.close()
            self.save(state)
            return state
        finally:
            if bar is not None:  # before any error is reported below it
                bar.close()
            self.close()

    def _latest(self) -> str:
        manager = self.manager()
        step = None if manager is None else manager.latest_step()
        return "none" if step is None else os.path.join(manager.directory, str(step))


def finetune(model, rows, tc: TrainConfig, batch_size: int = 8, seed: int = 0, workdir=None, progress: bool = True,
             on_step=None, too_long: str = "skip", mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
             lora: LoraConfig | None = None):
    """Fine-tunes a loaded `jaxvlm.Model` on rows {"prompt", "answer", "image"} and returns the tuned Model
    (the original is left as it was). Rows longer than the context are skipped or cut as `too_long` says
    (see `jaxvlm.data`). It trains on the mesh the model was loaded on, or on `mesh`.

    Every param is trained (float32 master weights), or with `lora` (a `LoraConfig`) only low-rank
    adapters beside the projections it names: the returned model holds them beside their kernels
    (`Model.merge_lora` folds them in; `Model.save` keeps them apart, `Model.export_hf` merges them)."""
    if not isinstance(tc, TrainConfig):
        raise ValueError(f"tc must be a TrainConfig, got {type(tc).__name__}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"lora must be a LoraConfig, got {type(lora).__name__}")
    if mesh is None and model.shard is not None and lora is None:
        mesh, rules = model.shard.mesh, dict(model.shard.rules) if rules is None else rules
    batches = RowBatches(model.config, model.tokenizer, rows, batch_size, seed, too_long=too_long)
    if lora is None:
        trainer = Trainer(model.config, tc, workdir, mesh, rules)
        state = trainer.fit(model.params, batches, progress, on_step)
        return Model(model.config, state.params, model.tokenizer, jnp.float32, trainer.shard)
    if model.config.lora is not None:
        raise ValueError("this model holds LoRA adapters already; merge them first (model.merge_lora())")
    if is_stacked(model.params):
        raise ValueError("LoRA adapters need unrolled layers: load the model with scan_layers=False")
    adapters = lora_lib.init(model.params, lora, contracted_axes(model.config), jax.random.key(seed))
    config = dataclasses.replace(model.config, lora=lora)
    trainer = Trainer(config, tc, workdir, mesh, rules, frozen=model.params)
    state = trainer.fit(adapters, batches, progress, on_step)
    return Model(config, lora_lib.attach(model.params, lora_lib.scaled(state.params, lora.scale)), model.tokenizer,
                 model.dtype, None)


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def loss_curve() -> tuple[list[float], Callable[[int, dict[str, float]], None]]:
    """A list and an `on_step` callback that appends each step's loss to it."""
    losses: list[float] = []
    return losses, lambda step, metrics: losses.append(metrics["loss"])
