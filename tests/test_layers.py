"""The layout is the architecture: layers, import rules and no cycles, checked from the source.

An AST walk of ``hub/``, ``spawners/``, ``provider/``, ``extensions/`` and ``dashboards/``
(every import statement, also those inside functions and ``if TYPE_CHECKING:`` blocks)
enforces:

* the control plane's layers, kernel ← db ← market ← billing ← portal ← stack: a module
  imports only from its own layer and those below it; every subpackage of ``hub`` is a
  layer, and only the kernel's modules sit flat in ``hub/``;
* node-side code, the spawner and the dashboards (``provider/``, ``extensions/``,
  ``spawners/``, ``dashboards/``) never import ``gpuportal.hub``, directly or through
  anything they import: the dashboards read the portal over HTTP as their user;
* ``spawners/`` reach the portal only through ``spawners/portal_client.py``: no other
  spawner module names a path of the portal's API;
* no import cycle among the modules of those folders.

The checker is plain functions over a folder, so the test of the test below runs it on a
small tree with one violation of each kind and sees each reported.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The folders checked; each is the subpackage ``gpuportal.<folder>``.
PACKAGES = ("hub", "spawners", "provider", "extensions", "dashboards")
#: The control plane's layers, lowest first; "kernel" is the modules flat in ``hub/``.
LAYERS = ("kernel", "db", "market", "billing", "portal", "stack")
#: The only modules that may sit flat in ``hub/`` (besides ``__init__``).
KERNEL = frozenset({"settings", "errors", "timeutil", "egress"})
#: Code that must not reach the control plane: it runs on provider machines or in the hub
#: process, and talks to the portal over HTTP.
NO_HUB = (
    "gpuportal.provider",
    "gpuportal.extensions",
    "gpuportal.spawners",
    "gpuportal.dashboards",
)
#: The one spawner module that may talk to the portal's API.
PORTAL_CLIENT = "gpuportal.spawners.portal_client"
#: A string naming a path of the portal's API (``api/v1``, ``/api/v1/offers``, ...).
PORTAL_API_PATH = re.compile(r"(?:^|/)api/v1(?:/|$)")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int


def collect(root: Path) -> dict[str, Module]:
    """Every module of the checked folders under ``root``, by dotted name."""
    modules: dict[str, Module] = {}
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            parts = ["gpuportal", *path.relative_to(root).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            modules[name] = Module(name, path, is_package, tree)
    return modules


def imports_of(module: Module, known: set[str] | dict[str, Module]) -> Iterator[Import]:
    """Every ``gpuportal`` module that ``module`` imports, wherever the statement is.

    ``from package import name`` counts as an import of ``package.name`` when that is
    a module, else of ``package``; relative imports are resolved against the module.
    """
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module.name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.name if module.is_package else module.name.rpartition(".")[0]
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield Import(module.name, sub if sub in known else target, node.lineno)


def layer_of(name: str, modules: dict[str, Module]) -> str | None:
    """The layer of a ``gpuportal.hub`` module; None outside the control plane, and
    ``"?"`` for a subpackage of ``hub`` that is no layer (or a module in one)."""
    if name == "gpuportal.hub":
        return "kernel"
    if not name.startswith("gpuportal.hub."):
        return None
    parts = name.split(".")
    if parts[2] in LAYERS[1:]:
        return parts[2]
    flat = len(parts) == 3 and not (name in modules and modules[name].is_package)
    return "kernel" if flat else "?"


def graph(modules: dict[str, Module]) -> dict[str, list[Import]]:
    return {
        name: [i for i in imports_of(m, modules) if i.target.startswith("gpuportal")]
        for name, m in modules.items()
    }


def where(modules: dict[str, Module], imp: Import, root: Path) -> str:
    return f"{modules[imp.source].path.relative_to(root)}:{imp.line}"


def layer_violations(modules: dict[str, Module], root: Path) -> list[str]:
    found = []
    for name, module in modules.items():
        layer = layer_of(name, modules)
        if layer == "?":
            found.append(f"{module.path.relative_to(root)}: {name} is in no layer {LAYERS}")
        elif layer == "kernel" and name != "gpuportal.hub" and name.split(".")[2] not in KERNEL:
            found.append(
                f"{module.path.relative_to(root)}: {name} sits flat in hub/ but is not a "
                f"kernel module ({', '.join(sorted(KERNEL))}); move it into its layer"
            )
    for imports in graph(modules).values():
        for imp in imports:
            mine, theirs = layer_of(imp.source, modules), layer_of(imp.target, modules)
            if mine in (None, "?") or theirs in (None, "?"):
                continue
            if LAYERS.index(theirs) > LAYERS.index(mine):
                found.append(
                    f"{where(modules, imp, root)}: {imp.source} ({mine}) imports "
                    f"{imp.target} ({theirs}), a higher layer"
                )
    return found


def hub_reach_violations(modules: dict[str, Module], root: Path) -> list[str]:
    """Node-side and spawner modules that reach ``gpuportal.hub``, with the chain."""
    edges = graph(modules)
    found = []
    for start in sorted(modules):
        if not start.startswith(NO_HUB):
            continue
        chains: dict[str, list[Import]] = {start: []}
        todo = [start]
        while todo:
            current = todo.pop()
            for imp in edges.get(current, []):
                if imp.target in chains:
                    continue
                chain = [*chains[current], imp]
                if imp.target == "gpuportal.hub" or imp.target.startswith("gpuportal.hub."):
                    first = chain[0]
                    path = " -> ".join([start, *(i.target for i in chain)])
                    found.append(f"{where(modules, first, root)}: {path} (never import the hub)")
                    todo = []
                    break
                chains[imp.target] = chain
                todo.append(imp.target)
    return found


def portal_client_violations(modules: dict[str, Module], root: Path) -> list[str]:
    """Spawner modules, other than the portal client, that name a portal API path."""
    found = []
    for name, module in modules.items():
        if not name.startswith("gpuportal.spawners") or name == PORTAL_CLIENT:
            continue
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and PORTAL_API_PATH.search(node.value)
            ):
                found.append(
                    f"{module.path.relative_to(root)}:{node.lineno}: {name} names the portal "
                    f"API path {node.value!r}; go through {PORTAL_CLIENT}"
                )
    return found


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing
    itself): each is an import cycle. Tarjan's algorithm, iteratively."""
    edges = {
        name: sorted({i.target for i in imports if i.target in modules})
        for name, imports in graph(modules).items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root_name in sorted(edges):
        if root_name in index:
            continue
        work = [(root_name, iter(edges[root_name]))]
        index[root_name] = low[root_name] = counter
        counter += 1
        stack.append(root_name)
        on_stack.add(root_name)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(sorted(component))
    return found


def check(root: Path) -> list[str]:
    """Every violation of the layout's rules in the tree at ``root``, one line each."""
    modules = collect(root)
    return [
        *layer_violations(modules, root),
        *hub_reach_violations(modules, root),
        *portal_client_violations(modules, root),
        *(f"import cycle: {' <-> '.join(c)}" for c in cycles(modules)),
    ]


# --- the real tree ---------------------------------------------------------------------------


def test_the_tree_keeps_its_layers_and_import_rules() -> None:
    problems = check(ROOT)
    assert problems == [], "\n".join(problems)


def test_the_checker_sees_the_whole_tree() -> None:
    """The rules above hold vacuously if nothing is read: the checker must see every
    layer and the known edges between them (a guard against a silently empty walk)."""
    modules = collect(ROOT)
    assert {layer_of(name, modules) for name in modules} >= set(LAYERS) | {None}
    edges = {(i.source, i.target) for imports in graph(modules).values() for i in imports}
    assert ("gpuportal.hub.portal.auth", "gpuportal.hub.portal.context") in edges
    assert ("gpuportal.hub.billing.metering", "gpuportal.provider.money") in edges
    # an import inside a function counts
    assert ("gpuportal.hub.stack.cli", "gpuportal.hub.stack.updown") in edges


# --- the test of the test ------------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


#: A small tree that keeps every rule.
CLEAN = {
    "hub/__init__.py": "",
    "hub/settings.py": "",
    "hub/db/__init__.py": "from ..settings import x\nfrom . import models\n",
    "hub/db/models.py": "from .. import settings\n",
    "hub/market/__init__.py": "",
    "hub/market/placement.py": "from ..db import models\n",
    "hub/billing/__init__.py": "",
    "hub/billing/ledger.py": "from ..market import placement\n",
    "hub/portal/__init__.py": "",
    "hub/portal/context.py": "from ..billing import ledger\n",
    "hub/portal/auth.py": "from .context import Portal\n",
    "hub/portal/app.py": "from .auth import x\nfrom .context import Portal\n",
    "hub/stack/__init__.py": "",
    "hub/stack/cli.py": "def up():\n    from ..portal import app\n",
    "provider/__init__.py": "",
    "provider/money.py": "MICRO = 1_000_000\n",
    "spawners/__init__.py": "",
    "spawners/portal_client.py": 'API = "api/v1"\n',
    "spawners/form.py": "from gpuportal.provider.money import MICRO\n",
    "extensions/__init__.py": "",
    "extensions/usage.py": "from gpuportal.provider import money\n",
    "dashboards/__init__.py": "",
    "dashboards/display.py": "from gpuportal.provider.money import format_credits\n",
}


def test_the_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    write(tmp_path, CLEAN)
    assert check(tmp_path) == []


@pytest.mark.parametrize(
    ("files", "reported"),
    [
        pytest.param(
            {"hub/db/models.py": "def f():\n    from ..portal.app import create_app\n"},
            "gpuportal.hub.db.models (db) imports gpuportal.hub.portal.app (portal), a higher",
            id="a-lower-layer-imports-a-higher-one-inside-a-function",
        ),
        pytest.param(
            {
                "hub/market/placement.py": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from gpuportal.hub.billing import ledger\n"
                )
            },
            "gpuportal.hub.market.placement (market) imports gpuportal.hub.billing.ledger",
            id="the-market-imports-billing-for-a-type",
        ),
        pytest.param(
            {"hub/settings.py": "from .db import models\n"},
            "gpuportal.hub.settings (kernel) imports gpuportal.hub.db.models (db)",
            id="the-kernel-imports-the-db",
        ),
        pytest.param(
            {"hub/metering.py": ""},
            "gpuportal.hub.metering sits flat in hub/ but is not a kernel module",
            id="a-flat-module-outside-the-kernel",
        ),
        pytest.param(
            {"hub/payouts/__init__.py": ""},
            "gpuportal.hub.payouts is in no layer",
            id="a-subpackage-that-is-no-layer",
        ),
        pytest.param(
            {"provider/agent.py": "import gpuportal.hub.settings\n"},
            "gpuportal.provider.agent -> gpuportal.hub.settings (never import the hub)",
            id="node-side-code-imports-the-hub",
        ),
        pytest.param(
            {
                "extensions/usage.py": "from gpuportal.provider import money\n",
                "provider/money.py": "def f():\n    from gpuportal.hub.billing import ledger\n",
            },
            "gpuportal.extensions.usage -> gpuportal.provider.money -> "
            "gpuportal.hub.billing.ledger",
            id="the-extension-reaches-the-hub-through-the-provider",
        ),
        pytest.param(
            {"dashboards/client.py": "def f():\n    from gpuportal.hub.db import transaction\n"},
            "gpuportal.dashboards.client -> gpuportal.hub.db (never import the hub)",
            id="a-dashboard-reads-the-db-instead-of-the-portal-api",
        ),
        pytest.param(
            {"spawners/spawner.py": 'URL = f"{base}/api/v1/reservations"\n'},
            "gpuportal.spawners.spawner names the portal API path '/api/v1/reservations'",
            id="a-spawner-module-calls-the-portal-itself",
        ),
        pytest.param(
            {
                "hub/portal/auth.py": "from .context import Portal\nfrom . import app\n",
            },
            "import cycle: gpuportal.hub.portal.app <-> gpuportal.hub.portal.auth",
            id="an-import-cycle",
        ),
        pytest.param(
            {"spawners/form.py": "def f():\n    from .form import f\n"},
            "import cycle: gpuportal.spawners.form",
            id="a-module-importing-itself",
        ),
    ],
)
def test_the_checker_reports_a_deliberate_violation(
    tmp_path: Path, files: dict[str, str], reported: str
) -> None:
    write(tmp_path, {**CLEAN, **files})
    problems = check(tmp_path)
    assert any(reported in p for p in problems), "\n".join(problems) or "nothing reported"
