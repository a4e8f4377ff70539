"""notebooks/quickstart.ipynb runs top to bottom on CPU in a kernel of this venv, and its steps really happen."""

import json
import os
import re
import sys

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
KERNEL_NAME = "paddle-llm-test"


def _text_outputs(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def test_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    # every code cell is introduced by a markdown cell saying what it does
    for previous, cell in zip(notebook.cells, notebook.cells[1:]):
        if cell.cell_type == "code":
            assert previous.cell_type == "markdown" and "next cell" in previous.source


@pytest.mark.slow  # preprocesses, trains and serves
def test_quickstart_notebook_runs_on_cpu(tmp_path, monkeypatch):
    # A kernelspec pointing at this interpreter, found through JUPYTER_PATH only: whatever "python3" kernel the
    # machine has, the notebook runs in the venv under test.
    prefix = tmp_path / "jupyter"
    install_kernelspec(kernel_name=KERNEL_NAME, prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    workdir = tmp_path / "work"
    monkeypatch.setenv("PADDLE_LLM_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name=KERNEL_NAME, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = _text_outputs(notebook)
    interpreter = re.search(r"^python:\s+(\S+)$", text, re.M).group(1)
    assert os.path.realpath(interpreter) == os.path.realpath(sys.executable)
    first, last = map(float, re.search(r"pretraining loss: ([\d.]+) -> ([\d.]+)", text).groups())
    assert first > 6.0 and last < first - 1.0
    with open(workdir / "pretrain" / "metrics.jsonl", encoding="utf-8") as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    assert (round(losses[0], 3), round(losses[-1], 3)) == (first, last)
    assert re.search(r"held-out exact match: \d+% of 50", text)
    assert (workdir / "export" / "paddle_llm_export.json").is_file()
    answer = re.search(r"served answer: '(.*)'", text).group(1)
    assert answer.strip()
    assert "server exit code: 0" in text
    assert not (tmp_path / "quickstart_output").exists()  # everything went to the directory the env var named
