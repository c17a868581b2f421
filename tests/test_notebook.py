"""notebooks/colab.ipynb runs top to bottom in tiny-model mode (nbclient, a local kernel), twice: the second *Run
all* (what a user does after a Colab disconnect) redoes no finished step. The committed file carries no outputs."""
from __future__ import annotations

import json

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "colab.ipynb"


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def _execute(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_resumes(ft_home, monkeypatch):
    monkeypatch.setenv("NB_TINY", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    nb = _execute(ft_home)
    out = ft_home / "outputs" / "smollm2-tiny"
    metrics = json.loads((out / "eval/metrics.json").read_text())
    text = _text(nb)
    assert f"{metrics['tuned'][metrics['primary_metric']]:.4f}" in text  # printed from the run's own metrics
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))  # loss.png inline
    assert any("text/markdown" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))  # report.md
    assert "scripts/02_sft_qlora.py" in text and (out / "merged/README.md").exists()
    # Run all again (a reconnect): every step is up to date, nothing is redone
    again = _text(_execute(ft_home))
    assert not any(f"scripts/{s}.py" in again for s in ("01_prepare", "02_sft_qlora", "03_merge_fp16", "04_eval"))
