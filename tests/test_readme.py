"""The README's Python examples run as written, and its commands match CI."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert len(bash) >= 2
    for cmd in bash[1].strip().split(" && ")[2:]:  # after venv creation and activation
        assert cmd.strip() in ci, f"CI does not run the README's `{cmd}`"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md", "notebooks/README.md"])
def test_relative_links_resolve(doc):
    """Every relative link (file, image, #section) of the front door and its companions exists."""
    path = ROOT / doc
    text = path.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target) if target else path
        assert file.exists(), f"{doc} links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{doc}: no section #{anchor} in {file.name}"


def test_benchmark_results_moved_not_lost():
    """The full results live in benchmarks/README.md, each table with its command."""
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    for needle in ("deq_vs_explicit --profile full", "inference --profile full",
                   "test_time_compute --profile full", "memory --profile full", "solvers --profile full",
                   "backward --profile full", "mondeq_digits --profile quick", "--split validation",
                   "--out benchmarks/results"):
        assert needle in bench, needle
