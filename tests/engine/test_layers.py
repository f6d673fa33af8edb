"""Layers: the engine imports without Dagster (a meta-path hook refuses it); the harness stays out of the product."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCK_DAGSTER = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dagster" or name.startswith(("dagster.", "dagster_")):
            raise ImportError("dagster is not allowed in the engine: " + name)
sys.meta_path.insert(0, Refuse())
import pkgutil, importlib, backfill
for mod in pkgutil.iter_modules(backfill.__path__):
    importlib.import_module("backfill." + mod.name)
assert not [m for m in sys.modules if m.split(".")[0] == "dagster"]
print("ok")
"""


def test_engine_imports_without_dagster():
    result = subprocess.run([sys.executable, "-c", BLOCK_DAGSTER], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_probe_does_catch_a_dagster_import():
    # the check above must be able to fail: importing the Dagster layer is refused
    probe = BLOCK_DAGSTER.replace("print(\"ok\")", "import assets.embeddings")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "dagster is not allowed in the engine" in result.stderr


def test_nothing_unpickles_untrusted_files():
    import re

    offenders = []
    for folder in ("backfill", "assets", "ops", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for pattern in (r"pickle\.loads?\(", r"torch\.load\((?![^)]*weights_only=True)", r"np\.load\([^)]*allow_pickle=True"):
                if re.search(pattern, text):
                    offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert offenders == []


PRODUCT = ("backfill", "assets", "ops")
HARNESS = REPO / "harness"


def _packages_find() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]


def test_the_installed_packages_are_the_product_and_not_the_harness():
    from setuptools import find_packages

    find = _packages_find()
    shipped = set(find_packages(str(REPO), include=find.get("include", ["*"]), exclude=find.get("exclude", ())))
    assert set(PRODUCT) <= shipped
    assert not [p for p in shipped if p.split(".")[0] not in PRODUCT], shipped


def test_harness_modules_live_only_in_harness():
    # moving one back under the product would ship it again
    names = {p.stem for p in HARNESS.glob("*.py") if p.stem != "__init__"}
    assert {"chaos", "local_s3", "local_instance"} <= names
    product = {p.stem for folder in PRODUCT for p in (REPO / folder).rglob("*.py")}
    assert names & product == set()


def test_no_product_module_imports_the_harness():
    import ast

    offenders = []
    for folder in PRODUCT:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                outside = [n for n in names if n.split(".")[0] in ("harness", "tests")]
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in outside]
    assert offenders == []


def test_the_harness_is_not_importable_from_the_installed_package(tmp_path):
    # -I: no cwd, no PYTHONPATH on sys.path, so only what is installed is found
    probe = "import importlib.util as u; print(u.find_spec('backfill') is not None, u.find_spec('harness') is None)"
    result = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"], "expected the product installed (scripts/setup.sh) and no harness"
