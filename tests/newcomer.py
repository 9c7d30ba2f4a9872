"""A newcomer's shell for the CLI tests: an environment without any of our variables, and
the `hoomi` command of the checkout's venv run in it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from server.testing.replica import ROOT

# Set by the test's own environment, never inherited: the newcomer has none of them.
FOREIGN = ("DATABASE_URL", "REDIS_URL", "HOOMI_URL", "HOOMI_HOST", "HOOMI_PORT",
           "HOOMI_DATA_DIR", "HOOMI_ADMIN_TOKEN", "HOOMI_JWT_SECRET", "HOOMI_JWT_ISSUER",
           "HOOMI_JWT_AUDIENCE", "XDG_DATA_HOME", "VIRTUAL_ENV", "PYTHONPATH",
           "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")  # `make test` runs us


def newcomer_env(home: Path, **exported: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(HOME=str(home), TERM="dumb", **exported)
    return env


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "hoomi"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)
