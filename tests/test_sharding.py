"""Sharding over a device mesh. The tests on 8 simulated devices (tests/mesh) run in a process of their
own; this module starts it, and checks the arguments that are refused on any machine."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxvlm
from jaxvlm.sharding import MeshRules
from tests.conftest import cache_of_its_own

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_on_8_simulated_devices(request):
    """tests/mesh, in the process conftest.py started when the tests were collected."""
    from tests.conftest import mesh_suite_outcome
    status, output = mesh_suite_outcome(request.config)
    assert status == 0, output[-12000:]


@pytest.mark.parametrize("make, message", [
    (lambda: jax.make_mesh((1,), ("tensor",)), "mesh: unknown axis name 'tensor'; jaxvlm's mesh axes are data, fsdp, "
                                               "model, expert"),
    (lambda: "data", "mesh must be a jax.sharding.Mesh"),
])
def test_bad_mesh_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        jaxvlm.load(mesh=make())


@pytest.mark.parametrize("rules, message", [
    ({"heads": "fsdp"}, "rules: 'heads' names mesh axis 'fsdp', which the mesh lacks \\(its axes: data, model\\)"),
    ({"heads": 3}, "rules: 'heads': .* is not a logical name mapped to mesh axis names"),
    (["heads"], "rules must map logical axis names to mesh axes"),
])
def test_bad_rules_are_named(rules, message):
    with pytest.raises(ValueError, match=message):
        MeshRules.create(jax.make_mesh((1, 1), ("data", "model")), rules)


def test_rules_without_a_mesh_are_refused():
    with pytest.raises(ValueError, match="rules: they place params on a mesh; give mesh= too"):
        jaxvlm.load(rules={"heads": "model"})


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_hosts_generate_and_train_as_one(hf_checkpoint, tiny_tokenizer_dir, tmp_path):
    """Two processes of 4 CPU devices each (gloo collectives) run one (2, 4) mesh: each gets, as plain
    numpy, the tokens and logits one process computes alone, and the same training losses."""
    import json
    import pickle
    from convert import convert
    from jaxvlm.train import Trainer, loss_curve
    from tests import multihost_worker as worker
    from tests import tiny_training as tiny

    folder = convert(hf_checkpoint("qwen3", seed=5), str(tmp_path / "jax"), progress=False)
    initial = jax.tree.map(np.asarray, tiny.init_params())
    with open(tmp_path / "params.pkl", "wb") as f:
        pickle.dump(initial, f)
    port = free_port()
    outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), str(port), folder,
                               tiny_tokenizer_dir, str(tmp_path / "params.pkl"), outs[i]], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=cache_of_its_own(os.environ, "4-devices"))
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    one = jaxvlm.load(folder)
    ids, mask = worker.left_pad(worker.PROMPTS)
    tokens = one.generate_ids(ids, mask, max_new_tokens=worker.NEW_TOKENS)
    logits = one.logits(ids, mask)
    losses, record = loss_curve()
    Trainer(tiny.TINY, tiny.train_config(worker.TRAIN_STEPS)).fit(
        initial, tiny.batches(tiny.tokenizer(tiny_tokenizer_dir), batch_size=4), progress=False,
        on_step=record)
    for out in outs:
        with open(out) as f:
            got = json.load(f)
        assert (got["devices"], got["local_devices"], got["types"]) == (8, 4, ["ndarray", "ndarray"])
        np.testing.assert_array_equal(got["tokens"], tokens)
        np.testing.assert_allclose(got["logits"], logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)


def test_load_before_distributed_initialize_in_a_multi_host_job_is_refused(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12345")
    with pytest.raises(RuntimeError, match=r"^load: this process is part of a multi-host job \(JAX_COORDINATOR_ADDRESS "
                                           r"is set\) but jax.distributed.initialize\(\) has not been called"):
        jaxvlm.load()
