"""Fixtures shared by the test modules: tiny transformers checkpoints, the convert-and-load round trip, and
tokenizer builders. Session-scoped where building is slow and the result is only read."""

from __future__ import annotations

import gc
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

# One XLA compilation cache for the whole run: this process, notebooks and every command a test starts read
# it from the environment (processes with another count of host devices: `cache_of_its_own`). Tests build
# the same tiny models again and again, and each new jit of the same program compiles it anew (a tiny
# training step: 4 s each time); with the cache a program is compiled once a run. Fresh each run: nothing
# carries over from one run to the next.
OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvlm-tests-xla-cache-")
    # Every program is kept, however quick to compile (test_train and test_lora: 60 s so, 73 s keeping those
    # of a second or more, 101 s with no cache). No size limit, so no lock: a worker that reads an entry
    # another is still writing gets a truncated file, which jax reports in a warning and compiles anew. (With
    # a limit jax locks the cache around each read and write and scans every entry at each write; a
    # fresh-clone run took 25.5 minutes either way.)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The tests' tiny models spend most of their time compiling: XLA:CPU skips LLVM's expensive passes, here
# and in every process a test starts (test_parity's gemma2 and qwen3 tests: 44-48 s of CPU time with them,
# 36-42 s without; the built-in model answers 200 questions in 7.0 s rather than 8.1). LLVM's lowest
# optimisation level compiled faster still (37 s) but ran 4.6 times slower (37.7 s), and the suite's
# evaluations of the built-in model and its fine-tuning notebook took 12 minutes more.
# LLVM's loop strength reduction, which the expensive passes leave in, took half of the machine-code
# emission: without it a tiny Gemma 2's logits program compiles in 1.6-1.9 s rather than 2.1-2.6, and
# the built-in model's training steps and answers run no slower.
FAST_COMPILES = "--xla_llvm_disable_expensive_passes=true --xla_backend_extra_options=-disable-lsr"
if "xla_llvm_disable_expensive_passes" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILES}".strip()


def cache_of_its_own(env: dict, name: str) -> dict:
    """`env` with a compilation cache of its own, beside the run's, for processes with another count of host
    devices (the 8-device suite, the several-hosts test's 4-device workers): jax leaves the device count
    out of a program's cache key, so no process should load a program compiled under another count."""
    return dict(env, JAX_COMPILATION_CACHE_DIR=f"{os.environ['JAX_COMPILATION_CACHE_DIR']}-{name}")

import jax

import jaxvlm
from tests import hf_models
from tests import tiny_training as tiny


def memory_maps() -> tuple[int, int] | None:
    """(memory maps this process holds, the most Linux allows a process); None off Linux."""
    try:
        with open("/proc/self/maps") as held, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in held), int(limit.read())
    except (OSError, ValueError):
        return None


@pytest.fixture(autouse=True)
def compiled_programs_let_go_near_the_map_limit():
    """After a test, once the process holds half the memory maps Linux allows, the compiled programs are let
    go (`jax.clear_caches`). XLA:CPU maps each program's code into memory, a dozen to a few dozen maps a
    program, and jax keeps every program of a live function: a worker that kept those of all its files
    crossed the limit (vm.max_map_count, 65,530) and crashed in whichever compile or cache load came next,
    and the 8-device suite's test_mesh.py alone reached 53,500. Below half, programs stay, shared by the
    tests that follow."""
    yield
    maps = memory_maps()
    if maps is not None and maps[0] > maps[1] // 2:
        gc.collect()
        jax.clear_caches()


TEXT = ["the quick brown fox jumps over the lazy dog", "a red circle above a blue square",
        "jax compiles numpy programs", "hello world, hello jax"] * 20


def _convert_command(hf_dir: str, out_dir: str, *extra: str) -> str:
    subprocess.run([sys.executable, "-m", "convert", hf_dir, out_dir, *extra], check=True, capture_output=True)
    return out_dir


@pytest.fixture(scope="session")
def convert_command():
    """(hf_dir, out_dir, *flags) -> out_dir, through the `convert` command line as a user runs it."""
    return _convert_command


@pytest.fixture(scope="session")
def convert_and_load(tmp_path_factory):
    """(torch model, name) -> jaxvlm.Model: save_pretrained, convert (in this process: the command's own
    tests run it as a user does, through `convert_command`), load."""
    from convert import convert

    def run(hf_model, name: str = "model") -> jaxvlm.Model:
        root = tmp_path_factory.mktemp(name)
        hf_dir = hf_models.save(hf_model, str(root / "hf"))
        return jaxvlm.load(convert(hf_dir, str(root / "jax"), progress=False))
    return run


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(family, seed, vision_language=False) -> a saved tiny random transformers checkpoint folder, built
    once per session for each argument set (read it; copy before editing)."""
    made: dict[tuple, str] = {}

    def get(name: str, seed: int = 0, vision_language: bool = False) -> str:
        key = (name, seed, vision_language)
        if key not in made:
            model = (hf_models.build_vlm if vision_language else hf_models.build)(name, seed=seed)
            made[key] = hf_models.save(model, str(tmp_path_factory.mktemp(f"{name}-{seed}") / "hf"))
        return made[key]
    return get


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A folder with the small SentencePiece model the training tests' rows are written in."""
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    tiny.tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    return tiny.tokenizer(tiny_tokenizer_dir)


def _gemma_tokenizer(directory: str, symbols: tuple[str, ...] = ()):
    """A tiny Gemma-style SentencePiece model (with `symbols` as single pieces, such as PaliGemma's
    `<image>`) written into `directory`, and transformers' tokenizer for it (BOS added)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_prefix=os.path.join(directory, "tokenizer"), vocab_size=120,
        model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=list(symbols), minloglevel=2)
    os.remove(os.path.join(directory, "tokenizer.vocab"))
    tok = GemmaTokenizer.from_pretrained(directory, add_bos_token=True)
    tok.save_pretrained(directory)
    return tok


def _qwen_tokenizer(directory: str, specials: tuple[str, ...] = ()):
    """A tiny byte-level BPE `tokenizer.json` with no BOS, as Qwen's, written into `directory` (with
    `specials` as special tokens after its pad and end-of-sequence ones), and transformers' wrapper for it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=250, special_tokens=["<|pad|>", "<|eos|>", *specials],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"), eos_token="<|eos|>",
                                   pad_token="<|pad|>")


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """(directory, symbols=()) -> transformers' tokenizer, its files written into `directory`."""
    return _gemma_tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """(directory) -> transformers' tokenizer, its tokenizer.json written into `directory`."""
    return _qwen_tokenizer


# tests/mesh needs 8 simulated devices, which must be asked for before jax starts its backend: it runs in
# a process of its own, started as soon as the tests are collected so that it runs beside the others (by
# the first worker when pytest-xdist runs several); tests/test_sharding.py::test_on_8_simulated_devices,
# in whichever process runs it, waits for its exit status file and reports its outcome.
collect_ignore = [] if os.environ.get("JAXVLM_MESH_TESTS") else ["mesh"]
MESH_SUITE = "tests/test_sharding.py::test_on_8_simulated_devices"
MESH_SUITE_KEY = pytest.StashKey[subprocess.Popen]()


OWN_MESH_SUITE_DIR = "PYTEST_XDIST_WORKER" not in os.environ and "JAXVLM_MESH_SUITE_DIR" not in os.environ


def pytest_configure(config):
    """The folder where the child suite writes its output and exit status, shared with any workers."""
    if OWN_MESH_SUITE_DIR:
        os.environ["JAXVLM_MESH_SUITE_DIR"] = tempfile.mkdtemp(prefix="jaxvlm-mesh-suite-")


def start_mesh_suite() -> subprocess.Popen:
    """The child pytest over tests/mesh: its output goes to `log`, then its exit status to `status`, in
    $JAXVLM_MESH_SUITE_DIR."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.environ["JAXVLM_MESH_SUITE_DIR"]
    suite = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "tests/mesh"]
    command = (f"{shlex.join(suite)} > {shlex.quote(os.path.join(folder, 'log'))} 2>&1; "
               f"echo $? > {shlex.quote(os.path.join(folder, 'status.tmp'))}; "
               f"mv {shlex.quote(os.path.join(folder, 'status.tmp'))} {shlex.quote(os.path.join(folder, 'status'))}")
    return subprocess.Popen(["bash", "-c", command], cwd=root, start_new_session=True,
                            env=cache_of_its_own(dict(os.environ, JAXVLM_MESH_TESTS="1"), "8-devices"))


def mesh_suite_outcome(config) -> tuple[int, str]:
    """(exit status, output) of the child suite, started now if no process started it."""
    folder = os.environ["JAXVLM_MESH_SUITE_DIR"]
    status = os.path.join(folder, "status")
    if MESH_SUITE_KEY not in config.stash and not _mesh_suite_starter():
        config.stash[MESH_SUITE_KEY] = start_mesh_suite()
    deadline = time.time() + 3600
    while not os.path.exists(status):
        if time.time() > deadline:
            return -1, "the 8-device suite wrote no exit status within an hour"
        time.sleep(1)
    with open(status) as f, open(os.path.join(folder, "log")) as log:
        return int(f.read()), log.read()


def _mesh_suite_starter() -> bool:
    """Whether another process (the first xdist worker) starts the child suite."""
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0"


# Files in the order the two processes take them (`--dist loadfile --no-loadscope-reorder` hands out whole
# files in collection order, rather than those with the most tests first): the longest first, as measured on the 2-core CI machine, so that no process is left with a long
# file at the end while the other idles. The one that waits for the 8-device suite comes once that suite
# (about 7 minutes) is likely done. test_train comes before test_bad_input (as long): the process done
# first with its first file compiles the tiny model's init and training step there, and the other finds
# them in the compilation cache when test_bad_input trains, minutes later (taken the other way round,
# both compiled them at once: 25-30 s of CPU twice).
LONGEST_FIRST = ["notebooks/04_finetune.ipynb", "tests/test_parity.py", "tests/test_train.py",
                 "tests/test_bad_input.py", "tests/test_layout.py", "tests/test_vlm.py", "tests/test_qwen_vl.py",
                 "tests/test_convert.py",
                 "tests/test_shapes.py", "tests/test_quantize.py", "tests/test_lora.py", "tests/test_sharding.py",
                 "tests/test_export.py", "tests/test_generate.py", "notebooks/03_convert_and_compare.ipynb",
                 "tests/test_gemma3.py", "tests/test_dataset.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = os.path.relpath(str(item.path), str(config.rootpath))
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: each file keeps its own order


def pytest_collection_finish(session):
    if any(item.nodeid == MESH_SUITE for item in session.items) and not _mesh_suite_starter():
        session.config.stash[MESH_SUITE_KEY] = start_mesh_suite()


def pytest_sessionfinish(session):
    """A run stopped early leaves no child suite behind; the run's compilation cache and the child suite's
    folder go."""
    started = session.config.stash.get(MESH_SUITE_KEY, None)
    if started is not None and started.poll() is None:
        os.killpg(started.pid, signal.SIGKILL)
    if OWN_COMPILATION_CACHE:
        for suffix in ("", "-8-devices", "-4-devices"):
            shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"] + suffix, ignore_errors=True)
    if OWN_MESH_SUITE_DIR:
        shutil.rmtree(os.environ["JAXVLM_MESH_SUITE_DIR"], ignore_errors=True)
