"""Layers import downward only, and `pollinate` is the only top-level name our code imports itself by.

Every module of every package pyproject.toml installs is parsed with ``ast`` (imports inside functions and under
TYPE_CHECKING count: they are dependencies too) and placed in a layer by the table below, most specific prefix
first (the root package's own modules are listed one by one: nothing lands in it unplaced). A module may import
its own layer and the ones below, except across the pairs in APART, and a command never imports another command.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.support.paths import REPO

# The architecture, as data (docs/architecture.md explains it). The most specific prefix decides a module's layer.
LAYERS: dict[str, int] = {
    # L0 foundations: what crosses the wire, the math, the models, the protocols, and how Flower runs here
    "pollinate": 0, "pollinate.proto": 0, "pollinate.strategies": 0, "pollinate.models": 0, "pollinate.secagg": 0,
    "pollinate.privacy": 0, "pollinate.security": 0, "pollinate.runtime": 0,
    # L1 the two Flower apps: the ClientApp and node training; the ServerApp, rounds and the store
    "pollinate.client": 1, "pollinate.server": 1,
    # L2 what runs the apps: the Simulation Engine driver and scenarios, the SuperLink launcher
    "pollinate.simulations": 2, "pollinate.server.launch": 2,
    # L3 the commands' shared vocabulary (flags, their defaults)
    "pollinate.flags": 3,
    # L4 the commands: each imports the others' lower modules, never another command
    "pollinate.server.cli": 4, "pollinate.server.status_cli": 4, "pollinate.server.report_cli": 4, "pollinate.simulations.cli": 4,
    "pollinate.client.node": 4,
    # L5 the `pollinate` entry point: the table of commands
    "pollinate.cli": 5,
}
ROOT = "pollinate"  # the root package: its modules are placed one by one, never by prefix
COMMANDS = 4
APART = (("pollinate.client", "pollinate.server"), ("pollinate.server", "pollinate.client"),  # the two apps
         ("pollinate.server.launch", "pollinate.simulations"), ("pollinate.simulations", "pollinate.server.launch"))


def package_dirs(repo: Path) -> dict[str, Path]:
    """``pollinate.<folder>`` -> its folder, as pyproject.toml's setuptools ``package-dir`` installs them."""
    table = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {package: repo / folder for package, folder in table.items()}


def modules(packages: Mapping[str, Path]) -> dict[str, Path]:
    """Every module's dotted name -> its file (a package's ``__init__`` under the package's own name)."""
    found = {}
    for package, folder in packages.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def layer_of(module: str, layers: Mapping[str, int]) -> int | None:
    prefixes = [p for p in layers if module == p or (p != ROOT and module.startswith(p + "."))]
    return layers[max(prefixes, key=len)] if prefixes else None


def imported(path: Path, module: str, known: Iterable[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``path`` imports; ``from a import b`` is ``a.b`` when that is a module."""
    known = set(known)
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.append((node.lineno, full if full in known else base))
    return sorted(set(names))


def layer_violations(packages: Mapping[str, Path], layers: Mapping[str, int]) -> list[str]:
    found = modules(packages)
    problems = []
    for module, path in found.items():
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{module} ({path}) has no layer: place it in LAYERS")
            continue
        for line, target in imported(path, module, found):
            if not target.startswith("pollinate"):
                continue
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > own:
                problems.append(f"{path.name}:{line}: {module} (L{own}) imports {target} (L{theirs}), a layer above")
            if theirs == own == COMMANDS and target != module:
                problems.append(f"{path.name}:{line}: the command {module} imports the command {target}; move "
                                f"what they share below the commands")
            if any(_within(module, a) and _within(target, b) for a, b in APART):
                problems.append(f"{path.name}:{line}: {module} imports {target}: these never import each other")
    return problems


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def bare_imports(files: Iterable[Path], folders: Iterable[str]) -> list[str]:
    """Imports of our own folders by their bare name (``import server``) instead of ``pollinate.server``."""
    folders = set(folders)
    problems = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            problems += [f"{path}:{node.lineno}: import {n}: import it as pollinate.{n}" for n in names
                         if n.split(".")[0] in folders]
    return problems


def _python_files(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*.py") if not any(part.startswith(".") or part in ("build", "node_modules")
                                                   for part in p.relative_to(repo).parts)]


def test_every_module_imports_only_its_own_layer_and_below() -> None:
    assert layer_violations(package_dirs(REPO), LAYERS) == []


def test_our_folders_are_imported_only_through_pollinate() -> None:
    folders = [folder.name for package, folder in package_dirs(REPO).items() if package != "pollinate"]
    assert "server" in folders and "runtime" in folders
    assert bare_imports(_python_files(REPO), folders) == []


def test_the_checks_catch_an_upward_import_a_client_server_import_and_a_bare_name(tmp_path: Path) -> None:
    """The two checks above on a made-up tree that breaks each rule once."""
    for folder, text in {"server": "from pollinate.simulations import cli\n",
                         "client": "def f():\n    from pollinate.server.store import RoundStore\n",
                         "simulations": "import server.app\nfrom .scenario import load\n"}.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
        (tmp_path / folder / "app.py").write_text(text)
    (tmp_path / "simulations" / "cli.py").write_text("")
    (tmp_path / "simulations" / "scenario.py").write_text("from pollinate.server import app\n")
    packages = {f"pollinate.{f}": tmp_path / f for f in ("server", "client", "simulations")}
    said = "\n".join(layer_violations(packages, LAYERS))
    assert "pollinate.server.app (L1) imports pollinate.simulations.cli (L4)" in said
    assert "pollinate.client.app imports pollinate.server.store: these never import each other" in said
    assert "scenario" not in said  # L2 importing L1, and a relative import, are fine
    assert len(layer_violations(packages, LAYERS)) == 2
    bare = bare_imports([tmp_path / "simulations" / "app.py"], ["server", "simulations"])
    assert len(bare) == 1 and "import server.app: import it as pollinate.server.app" in bare[0]


def test_the_checks_catch_what_issue_12_found(tmp_path: Path) -> None:
    """A command importing another command, the launcher importing the simulation engine, and process management
    in the root package all fail (each was in the tree before the restructure)."""
    for folder in ("server", "simulations", "root"):
        (tmp_path / folder).mkdir()
    (tmp_path / "server" / "cli.py").write_text("from pollinate.simulations.cli import load_scenario\n")
    (tmp_path / "server" / "launch.py").write_text("from pollinate.simulations.engine import write_app_dir\n")
    (tmp_path / "simulations" / "cli.py").write_text("")
    (tmp_path / "simulations" / "engine.py").write_text("")
    (tmp_path / "root" / "processes.py").write_text("")
    packages = {"pollinate.server": tmp_path / "server", "pollinate.simulations": tmp_path / "simulations",
                "pollinate": tmp_path / "root"}
    said = layer_violations(packages, LAYERS)
    assert any("the command pollinate.server.cli imports the command pollinate.simulations.cli" in s for s in said)
    assert any("pollinate.server.launch imports pollinate.simulations.engine" in s for s in said)
    assert any("pollinate.processes" in s and "has no layer" in s for s in said)
    assert len(said) == 3
