"""The package's module graph (scripts/import_graph.py): no import cycles, and the library never
imports the application subpackage."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_fastlla_has_no_import_cycle_and_the_library_does_not_import_apps():
    result = run()
    assert result.returncode == 0, result.stderr
    graph = {k.strip(): v for k, v in (line.split(" -> ") for line in result.stdout.splitlines())}
    assert graph["scalla"].split(", ").count("export") == 1  # the one direction kept
    assert "scalla" not in graph["export"].split(", ")
    assert graph["__main__"].strip() == "apps.cli"


def package(tmp_path, files):
    root = tmp_path / "fastlla"
    (root / "apps").mkdir(parents=True)
    for name, text in {"__init__.py": "", "apps/__init__.py": "", **files}.items():
        (root / name).write_text(text)
    return root


def test_a_lazy_import_cycle_is_found(tmp_path):
    root = package(
        tmp_path,
        {"a.py": "from .b import f\n", "b.py": "def f():\n    from . import a\n"},
    )
    result = run("--root", str(root))
    assert result.returncode == 1
    assert "import cycle: a -> b -> a" in result.stderr


def test_a_library_module_importing_apps_is_refused(tmp_path):
    root = package(tmp_path, {"a.py": "from fastlla.apps import demo\n", "apps/demo.py": ""})
    result = run("--root", str(root))
    assert result.returncode == 1
    assert "library module fastlla.a imports the application package" in result.stderr
    assert "a                        -> apps.demo" in result.stdout


def test_dot_output_lists_every_edge():
    result = run("--dot")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("digraph fastlla {")
    assert '"scalla" -> "export";' in result.stdout


def test_public_api_is_listed_in_all():
    import fastlla

    namespace = {}
    exec("from fastlla import *", namespace)
    exported = set(namespace) - {"__builtins__"}
    assert exported == set(fastlla.__all__) == {
        "ExactLLA", "ScaLLA", "Laplace", "Predictor", "Likelihood", "ood_score", "NotFittedError",
        "ModelChangedError", "NotPositiveDefiniteError", "DistributedMismatchError",
    }  # fmt: skip
    from fastlla.export import Predictor
    from fastlla.laplace import NotFittedError

    assert fastlla.Predictor is Predictor and fastlla.NotFittedError is NotFittedError


def test_architecture_page_shows_the_current_module_graph():
    """docs/architecture.md quotes the library's graph; regenerate it when the imports change."""
    page = (SCRIPT.parents[1] / "docs" / "architecture.md").read_text()
    quoted = page.split("## Module graph", 1)[1].split("```\n", 2)[1].rstrip("`\n")
    library = [
        line for line in run().stdout.splitlines() if not line.startswith(("apps", "__main__"))
    ]
    assert quoted.splitlines() == library
