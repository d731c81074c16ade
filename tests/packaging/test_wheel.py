"""The built wheel: one import package, `pollinate`, that works from outside the checkout.

The card's folders (server/, client/, ...) stay at the repository root and install as `pollinate.server`,
`pollinate.client`, ... through setuptools' package-dir mapping. These tests build the real wheel from the
tracked files, install it into a venv that has no access to this checkout, and load the Flower apps there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import REPO

OUR_FOLDERS = ("server", "client", "strategies", "proto", "models", "simulations", "secagg", "security", "privacy")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tracked files (no build isolation: its requirements are installed)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("pollinate-*.whl")
    return built


def test_the_wheel_holds_one_top_level_import_package_pollinate(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"pollinate"}, sorted(top)
    for folder in OUR_FOLDERS:
        assert f"pollinate/{folder}/__init__.py" in names, folder
    # What the code opens at run time travels too: migrations, scenarios, the bundled corpus, generated gRPC.
    for data in ("pollinate/server/migrations/env.py", "pollinate/simulations/scenarios/default.toml",
                 "pollinate/proto/pollinate_status_pb2_grpc.py"):
        assert data in names, data


def test_the_installed_wheel_loads_the_flower_apps_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # The dependencies (torch, flwr, ...) come from this environment's site-packages as a plain path entry: its
    # .pth files (among them the editable install's finder for this checkout) are not processed there.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = """
import importlib.util, sys
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.object_ref import load_app
import pollinate
server = load_app("pollinate.server.app:app", ValueError)
client = load_app("pollinate.client.app:app", ValueError)
assert isinstance(server, ServerApp) and isinstance(client, ClientApp)
print(pollinate.__file__)
print(sorted(n for n in %r if importlib.util.find_spec(n) is not None))
""" % (OUR_FOLDERS,)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    installed_at, generic_names = done.stdout.strip().splitlines()[-2:]
    assert Path(installed_at).is_relative_to(site), installed_at
    assert generic_names == "[]"  # no `import server`, `import client`, ... anywhere
