"""The install layout: kernels/ is llama3hp.kernels, never a top-level `kernels` package."""

import importlib
import subprocess
import sys
from pathlib import Path

import llama3hp

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_install_as_a_subpackage(tmp_path):
    k = importlib.import_module("llama3hp.kernels")
    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
    # Outside the checkout (no cwd on sys.path) the install must not expose our `kernels/` as a
    # top-level `kernels`. (The PyPI package of that name, which transformers 5 depends on, may be
    # installed: it lives in site-packages, perhaps under a .venv inside the checkout.)
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert not out.stdout.strip().startswith(str(ROOT / "kernels")), out.stdout


def test_top_level_layout():
    for name in (
        "csrc",
        "llama3hp",
        "kernels",
        "benchmarks",
        "launch",
        "tests",
        "setup.py",
        "CMakeLists.txt",
        "README.md",
    ):
        assert (ROOT / name).exists(), name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_version():
    assert llama3hp.__version__
