"""quotas is an app another project can install: it imports nothing from ducke, and the
checkout builds a wheel of it alone with its migrations, scripts, templates and static files."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import quotas

ROOT = Path(__file__).resolve().parent.parent
QUOTAS = ROOT / "quotas"


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_no_module_of_quotas_imports_ducke():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted(QUOTAS.rglob("*.py"))
        if "build" not in path.parts
        for name in imported_modules(path)
        if name == "ducke" or name.startswith("ducke.")
    ]
    assert offenders == []


FIRST_PARTY = {path.parent.name for path in ROOT.glob("*/__init__.py")}  # ducke, quotas, tests


def resolved_imports(path):
    """Every module ``path`` imports, relative imports made absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(ROOT).parts[:-1])
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                yield node.module
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            yield ".".join([*base, *([node.module] if node.module else [])])


def test_the_realtime_add_on_imports_only_from_the_generic_core():
    """quotas/realtime builds on the core (quotas.*) and its own modules, never on a project."""
    offenders = []
    for path in sorted((QUOTAS / "realtime").rglob("*.py")):
        for name in resolved_imports(path):
            top = name.split(".")[0]
            if top in FIRST_PARTY and top != "quotas":
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []
    meter = set(resolved_imports(QUOTAS / "realtime" / "meter.py"))
    assert {"quotas.spend", "quotas.pricing", "quotas.realtime.usage", "quotas.models"} <= meter


def test_the_import_scan_resolves_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "quotas" / "realtime"
    package.mkdir(parents=True)
    module = package / "m.py"
    module.write_text("from ..spend import x\nfrom . import usage\nfrom ducke.tools import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert list(resolved_imports(module)) == ["quotas.spend", "quotas.realtime", "ducke.tools"]


def test_the_scan_would_see_an_import_of_ducke(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ducke.tools import run_tool\n")
    assert "ducke.tools" in set(imported_modules(module))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    source = tmp_path_factory.mktemp("src") / "quotas"
    shutil.copytree(
        QUOTAS, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-q", "-w", str(out), str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    [built] = list(out.glob("*.whl"))
    return built


def test_the_checkout_builds_a_wheel_of_quotas_alone(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert wheel.name.startswith(f"django_quotas_realtime-{quotas.__version__}-")
    assert not [n for n in names if n.startswith("ducke")]
    for expected in (
        "quotas/lua/spend.lua",
        "quotas/lua/spend_replay.lua",
        "quotas/migrations/0001_initial.py",
        "quotas/management/commands/quotas_close_stale.py",
        "quotas/templates/admin/quotas/reports/report.html",
        "quotas/static/quotas/reports.css",
        "quotas/README.md",
    ):
        assert expected in names, expected
    realtime = {n for n in names if n.startswith("quotas/realtime/")}
    assert realtime == {f"quotas/realtime/{p.name}" for p in (QUOTAS / "realtime").glob("*.py")}, (
        "the Realtime add-on is part of the wheel"
    )
    assert "quotas/realtime/meter.py" in realtime
    migrations = {n for n in names if n.startswith("quotas/migrations/0")}
    on_disk = {f"quotas/migrations/{p.name}" for p in (QUOTAS / "migrations").glob("0*.py")}
    assert migrations == on_disk


def test_the_wheel_declares_its_version_and_dependencies(wheel):
    archive = zipfile.ZipFile(wheel)
    [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    text = archive.read(metadata).decode()
    assert f"Version: {quotas.__version__}" in text
    assert "Requires-Dist: Django" in text and "Requires-Dist: channels" in text
