"""The structure, enforced: the import contracts of pyproject.toml, Flower's internals
only in compat.py, and a FAB that holds what a run needs."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# flwr 1.42's internal packages and modules: only fedcifar_app/compat.py may import them.
FLOWER_INTERNALS = ("flwr.supercore", "flwr.compat", "flwr.supernode", "flwr.superlink",
                    "flwr.simulation", "flwr.cli", "flwr.proto", "flwr.common.config",
                    "flwr.common.secure_aggregation", "flwr.server.workflow.constant")


def test_the_import_contracts_hold():
    """task.py imports no Flower; the apps and extensions no operations tooling; the
    layers point downward; extensions import the core, not each other."""
    lint = shutil.which("lint-imports") or pytest.fail("import-linter is not installed "
                                                      "(pip install -e '.[test]')")
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_flowers_internals_are_used_in_compat_only():
    users = {}
    for path in [*(ROOT / "fedcifar_app").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        if path == ROOT / "fedcifar_app" / "compat.py":
            continue
        internal = sorted(m for m in imported_modules(path)
                          if m.startswith(tuple(p + "." for p in FLOWER_INTERNALS))
                          or m in FLOWER_INTERNALS)
        if internal:
            users[str(path.relative_to(ROOT))] = internal
    assert users == {}
    # The check finds what it looks for: compat.py itself uses them.
    assert any(m.startswith(FLOWER_INTERNALS) for m in
               imported_modules(ROOT / "fedcifar_app" / "compat.py"))


def test_the_apps_load_no_operations_tooling():
    probe = ("import sys; import fedcifar_app.client_app, fedcifar_app.server_app; "
             "print(sorted(m for m in sys.modules if m.startswith('fedcifar_app.ops')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_fab_holds_the_apps_and_nothing_else(tmp_path: Path):
    done = subprocess.run(["flwr", "build", "--app", str(ROOT)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = set(zipfile.ZipFile(fab).namelist())
    assert {"fedcifar_app/client_app.py", "fedcifar_app/server_app.py", "fedcifar_app/task.py",
            "fedcifar_app/extensions/privacy/server.py"} <= names
    shipped = {name.split("/")[0] if "/" in name else name for name in names}
    assert shipped <= {"fedcifar_app", "pyproject.toml", ".info"}, shipped
    assert not [name for name in names if name.startswith("fedcifar_app/ops/")
                or name.endswith(("centralized.py", "compare.py"))]
