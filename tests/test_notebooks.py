"""The notebooks (executed by the suite: through nbmake, the quickstart here) as a reader gets them: saved
outputs without progress bars or this machine's paths, and runnable from any working directory."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
NOISE = re.compile(r"\r|\d+it/s|s/it\]|\|[█▏▎▍▌▋▊▉ ]+\||/(tmp|work|home|root)/|site-packages|Warning")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_saved_outputs_are_clean(path):
    for i, cell in enumerate(json.load(open(path))["cells"]):
        source = "".join(cell["source"])
        assert "../" not in source, f"cell {i} reads a path relative to the notebooks folder"
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", [])) + "".join(output.get("data", {}).get("text/plain", []))
            assert not NOISE.search(text), f"cell {i}: {NOISE.search(text).group()!r} in {text[:200]!r}"


def test_a_notebook_runs_from_another_folder(tmp_path):
    """The quickstart, its one run in the suite (nbmake runs the others from their folder)."""
    import nbclient
    import nbformat
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "01_quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=240, resources={"metadata": {"path": str(tmp_path)}}).execute()
