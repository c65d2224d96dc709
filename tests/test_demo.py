"""The README's first command ends in `jaxvlm demo`: it must run the whole path and print generated text."""

import subprocess
import sys


def test_demo_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "generated (random weights): '" in result.stdout
    assert (tmp_path / "jaxvlm-gemma-tiny" / "config.json").is_file()
