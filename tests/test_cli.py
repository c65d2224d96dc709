"""The `jaxvlm` command as a new user meets it: --version, help for every option, streaming output, and a
Ctrl-C that ends it with one line, never a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxvlm.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jaxvlm_command(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxvlm.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), **kwargs)


def catches_sigint(pid: int, timeout: float = 60) -> None:
    """Waits until process `pid` has a handler for SIGINT (Linux: its SigCgt mask in /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never caught SIGINT")


def test_version():
    out = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "--version"], capture_output=True, text=True)
    from importlib import metadata
    assert out.returncode == 0 and out.stdout == f"jaxvlm {metadata.version('jaxvlm')}\n"


def test_import_loads_neither_numpy_nor_jax_and_lists_its_names():
    """`import jaxvlm` leaves numpy and jax to first use (the command's Ctrl-C handler is in place before
    they load), and `dir(jaxvlm)` still lists what `from jaxvlm import ...` finds."""
    code = ("import sys, jaxvlm; print(sorted({'numpy', 'jax'} & set(sys.modules)));"
            "print(all(n in dir(jaxvlm) for n in jaxvlm.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"], out


def test_every_option_has_help_text():
    parsers = [build_parser()]
    parsers += [p for action in parsers[0]._actions if isinstance(action, argparse._SubParsersAction)
                for p in action.choices.values()]
    for parser in parsers:
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{parser.prog} {'/'.join(action.option_strings) or action.dest} has no help"


def test_generate_prints_as_it_streams():
    """The answer arrives in pieces: the first is on stdout before the command ends."""
    process = jaxvlm_command("generate", "--prompt", "caption en", "--image", "examples/shapes.png")
    first = process.stdout.read(1)
    assert process.poll() is None or first  # the first character came while decoding went on, or at once
    rest = process.stdout.read()  # (through the same buffer: `communicate` would miss what it holds already)
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0, err
    assert first + rest == "a red circle left of a blue square above a green triangle\n"


@pytest.mark.parametrize("command, wait", [
    (("generate", "--prompt", "caption en", "--image", "examples/shapes.png"), 0.5),  # while jax loads
    (("generate", "--prompt", "caption en", "--image", "examples/shapes.png"), 2.0),  # loading or compiling
    (("train-shapes", "--out", "{tmp}/model", "--workdir", "{tmp}/work"), 15.0),
])
def test_ctrl_c_ends_with_one_line(tmp_path, command, wait):
    process = jaxvlm_command(*(a.format(tmp=tmp_path) for a in command))
    catches_sigint(process.pid)  # Python is up (a SIGINT before that, on a loaded machine, kills it outright)
    time.sleep(wait)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert not (tmp_path / "model").exists()
