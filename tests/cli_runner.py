"""Running the command line the way a user does: the installed `ldcache` console script (or
`python cli.py` from the checkout) in a real subprocess, and the shape of a user error."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

INSTALLED = Path(sys.executable).with_name("ldcache")  # the console script `pip install -e .` wrote


def cli_command(entry: str = "ldcache") -> list[str]:
    """The argv prefix of an entry point: "ldcache" (installed) or "cli.py" (the checkout)."""
    if entry == "cli.py":
        return [sys.executable, str(ROOT / "cli.py")]
    if not INSTALLED.exists():
        raise RuntimeError(f"{INSTALLED} is missing: install the project (make setup, or pip install -e .)")
    return [str(INSTALLED)]


def run_cli(*args, env_home=None, timeout=300, entry: str = "ldcache", env_extra: dict | None = None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "COLUMNS": "200",
           **{k: v for k, v in os.environ.items() if k.startswith("COVERAGE_")},  # `coverage run` measures it too
           **(env_extra or {})}
    if env_home:
        env["LDCACHE_HOME"] = str(env_home)
    return subprocess.run([*cli_command(entry), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # One error line, last on stderr (a progress bar may precede it), and no traceback.
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
