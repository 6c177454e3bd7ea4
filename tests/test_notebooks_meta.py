"""Static checks of the tutorial notebooks in notebooks/ (their execution is checked by nbmake).

The six numbered notebooks must exist, each paired (jupytext, percent format) with a script of
the same name holding the same cells, be committed with their outputs (at least one rendered
plot each, so they read well on the repository browser), import only deq's public API, and cite
the papers they build on in their markdown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = {
    "01": "01_quickstart.ipynb",
    "02": "02_solvers.ipynb",
    "03": "03_deq_vs_explicit.ipynb",
    "04": "04_convergence_guarantees.ipynb",
    "05": "05_gradients.ipynb",
    "06": "06_language_model.ipynb",
}
# A reference is an author name followed (on the same line or the next) by a year, e.g.
# "Bai, Kolter & Koltun, *Deep Equilibrium Models*, NeurIPS 2019" or "(Walker & Ni 2011)".
REFERENCE = re.compile(r"\b[A-Z][a-z]+(?:,| &| et al\.).{0,200}?\b(?:19|20)\d\d\b", re.S)
# Imports of a private deq module: `deq._x`, `deq.nn._layer`, `from deq.nn import _layer`, ...
PRIVATE_IMPORT = re.compile(
    r"^\s*(?:import\s+deq(?:\.\w+)*\._\w*|from\s+deq(?:\.\w+)*\._\w*\s+import|"
    r"from\s+deq(?:\.\w+)*\s+import\s+(?:\(?\s*)?_\w*)",
    re.M,
)
PRIVATE_ATTRIBUTE = re.compile(r"\bdeq(?:\.[a-z]\w*)*\._[a-z]\w*")


def _load(name: str) -> dict:
    with open(NOTEBOOKS / name, encoding="utf-8") as fh:
        return json.load(fh)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def test_numbered_notebooks_exist():
    numbered = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert numbered == sorted(EXPECTED.values()), f"expected exactly {sorted(EXPECTED.values())}, found {numbered}"
    assert [n[:2] for n in numbered] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("name", sorted(EXPECTED.values()))
def test_outputs_committed(name):
    nb = _load(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, (f"{name}: code cells {unexecuted} were not executed; run "
                            f"`jupytext --sync --execute notebooks/{name[:-6]}.py`")
    images = sum("image/png" in out.get("data", {}) for c in code for out in c.get("outputs", []))
    assert images >= 1, f"{name} has no image/png output: commit it executed, with its plots"
    errors = [out for c in code for out in c.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{name} was committed with an error output: {errors[0].get('ename')}"


def test_jupytext_pairs_every_notebook():
    config = (NOTEBOOKS / "jupytext.toml").read_text(encoding="utf-8")
    assert re.search(r'^formats\s*=\s*"ipynb,py:percent"', config, re.M)
    scripts = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    assert scripts == sorted(n.replace(".ipynb", ".py") for n in EXPECTED.values())
    assert not (NOTEBOOKS / "_build.py").exists()  # the scripts are the sources now


@pytest.mark.parametrize("name", sorted(EXPECTED.values()))
def test_script_and_notebook_hold_the_same_cells(name):
    """Edit either file of a pair, then `jupytext --sync` it: the two never drift apart."""
    jupytext = pytest.importorskip("jupytext")
    script = jupytext.read(NOTEBOOKS / name.replace(".ipynb", ".py"))
    nb = _load(name)
    assert [(c.cell_type, c.source) for c in script.cells] == [
        (c["cell_type"], _source(c)) for c in nb["cells"]
    ], f"{name} and its .py differ: run `jupytext --sync notebooks/{name}`"


@pytest.mark.parametrize("name", sorted(EXPECTED.values()))
def test_only_public_api(name):
    nb = _load(name)
    code = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code")
    assert re.search(r"^\s*import deq\s*$", code, re.M), f"{name} does not `import deq`"
    bad = PRIVATE_IMPORT.findall(code) + PRIVATE_ATTRIBUTE.findall(code)
    assert not bad, f"{name} uses private deq modules or names: {bad}"


@pytest.mark.parametrize("name", sorted(EXPECTED.values()))
def test_markdown_with_references(name):
    nb = _load(name)
    markdown = [_source(c) for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert len(markdown) >= 3, f"{name} needs prose between its code cells ({len(markdown)} markdown cells)"
    assert markdown and nb["cells"][0]["cell_type"] == "markdown", f"{name} should open with a markdown cell"
    assert any(REFERENCE.search(m) for m in markdown), f"{name} cites no paper (author and year) in its markdown"


def test_reference_pattern():
    assert REFERENCE.search("Bai, Kolter & Koltun, *Deep Equilibrium Models*, NeurIPS 2019")
    assert REFERENCE.search("(Walker & Ni 2011)")
    assert not REFERENCE.search("no citation here, just 2019 things")
    assert PRIVATE_IMPORT.search("from deq._fixed_point import fixed_point")
    assert PRIVATE_IMPORT.search("import deq.nn._layer")
    assert PRIVATE_IMPORT.search("from deq.nn import _layer")
    assert not PRIVATE_IMPORT.search("import deq.train\nfrom deq.nn import DEQ")
    assert PRIVATE_ATTRIBUTE.search("deq.nn._layer.DEQ")
    assert not PRIVATE_ATTRIBUTE.search("model._encode(x)")
