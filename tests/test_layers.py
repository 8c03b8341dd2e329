"""The layer rules of ARCHITECTURE.md are checked by a tool, and the tool catches a break.

- `make lint` runs import-linter over the contracts in pyproject.toml ([tool.importlinter]); here a scratch
  copy of the packages gets one forbidden import each time and the check must fail, naming the contract.
- No two files of the project's own packages import each other in a loop, counting the imports inside
  functions (grimp, which import-linter uses, sees those too): a function-local import never hides a cycle.
- No module of the platform imports a project module inside a function unless it is listed, with its reason.
- Every module at portal's top level is either named in the domain contract or is wiring/pages, so a new
  module cannot slip past the domain's rules unclassified.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
PACKAGES = PYPROJECT["root_packages"]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# portal's modules that may reach up (they wire the apps in) and the pages; everything else is the domain.
PORTAL_WIRING = {"portal.settings", "portal.urls", "portal.asgi", "portal.wsgi", "portal.apps", "portal.web"}
PORTAL_WIRING.add("portal.asgi_split")  # the production server's application (it serves portal.asgi's too)


def _contract(contract_id: str) -> dict:
    return next(c for c in PYPROJECT["contracts"] if c["id"] == contract_id)


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The project's packages (Python files only) and pyproject.toml, copied."""
    root = tmp_path_factory.mktemp("layers")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            root / package,
            ignore=lambda d, names: (
                [n for n in names if not n.endswith(".py") and not (Path(d) / n).is_dir()]
                + [n for n in names if n in ("__pycache__", "static", "templates", "node_modules")]
            ),
        )
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_tree():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# (file to add, its text, the contract it must break)
BREAKS = [
    # the domain enqueuing a task by importing it instead of sending it by name
    ("portal/services/_break.py", "from workers.tasks import schedule_task\n", "domain"),
    # ... or reaching up into the registry from inside a function (local imports count too)
    ("portal/services/_break.py", "def f():\n    from env_registry import services\n", "domain"),
    ("portal/models/_break.py", "import portal.web.jobs\n", "domain"),
    ("opentinker/_break.py", "import django\n", "sdk"),
    ("opentinker/env/_break.py", "from portal import models\n", "sdk"),
    # a tracker imported outside opentinker/export.py (the SDK must import without the optional extras)
    ("opentinker/_break.py", "def f():\n    import wandb\n", "sdk-trackers"),
    ("gpu_runtime/_break.py", "from django.conf import settings\n", "runtime"),
    ("api/views/_break.py", "import torch\n", "web-tier"),
    ("workers/_break.py", "from gpu_runtime import controller\n", "web-tier"),
    ("env_registry/_break.py", "from workers import env_tasks\n", "registry"),
    ("workers/_break.py", "from api.views import jobs\n", "workers"),
    ("api/_break.py", "from portal.web import jobs\n", "api"),
    ("portal/services/_break.py", "from devstack.embedded import EmbeddedServices\n", "devstack"),
    ("devstack/_break.py", "import django\n", "devstack-below-django"),
]


@pytest.mark.parametrize(("path", "text", "contract_id"), BREAKS)
def test_a_forbidden_import_fails_the_check(scratch, path, text, contract_id):
    added = scratch / path
    added.write_text(text)
    try:
        result = _lint(scratch)
    finally:
        added.unlink()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{_contract(contract_id)['name']} BROKEN" in " ".join(output.split()), output


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle_between_files():
    # grimp records every import statement, those inside functions included.
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_function_local_cycle(tmp_path):
    pkg = tmp_path / "loop"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loop import b\n")
    (pkg / "b.py").write_text("def f():\n    from loop import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert _cycles(grimp.build_graph("loop", cache_dir=None)) == [["loop.a", "loop.b"]]
    finally:
        sys.path.remove(str(tmp_path))


def test_every_portal_module_is_classified():
    graph = grimp.build_graph("portal", cache_dir=None)
    domain = set(_contract("domain")["source_modules"])
    top = set(graph.find_children("portal"))
    assert top - domain - PORTAL_WIRING == set(), "name the new module in the domain contract"
    assert domain - top == set(), "the domain contract names a module that no longer exists"


# Modules of the platform that may import project modules inside functions, each for its reason; any other
# function-local import of a project module is an error (a cycle dodged is still a cycle).
LOCAL_IMPORTS_ALLOWED = {
    "api.apps": "AppConfig.ready: models are importable only once the app registry is ready",
    "env_registry.apps": "AppConfig.ready: registers the registry's resolver",
    "api.tinker.apps": "AppConfig.ready: registers the live-session check (selectors need the app registry)",
    "portal.apps": "AppConfig.ready: the pages' start-up checks",
    "workers.runner": "a standalone process: Django is set up first, then the models are imported",
    "api.schema": "DRF imports it by name from its settings while loading its views; the views come after",
    "api.middleware": "the archive size default (one settings declaration: the settings work of issue 12)",
}


def _function_local_project_imports() -> set[tuple[str, str]]:
    found = set()
    for package in ("portal", "api", "workers", "env_registry"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                        names = [sub.module]
                    elif isinstance(sub, ast.Import):
                        names = [alias.name for alias in sub.names]
                    else:
                        continue
                    found |= {(module, name) for name in names if name.split(".")[0] in PACKAGES}
    return found


def test_no_function_local_import_of_a_project_module_without_a_reason():
    found = _function_local_project_imports()
    unexplained = {(m, name) for m, name in found if m not in LOCAL_IMPORTS_ALLOWED}
    assert unexplained == set(), "import these at module level (or say why not in LOCAL_IMPORTS_ALLOWED)"
