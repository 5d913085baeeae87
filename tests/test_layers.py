"""The layer rule (pyproject.toml's import-linter contracts, run by `make lint`) holds on the
tree and fails when a lower layer imports a higher one."""

import shutil
import subprocess
import sys
from pathlib import Path

from _helpers import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300, check=False)


def test_contracts_hold_and_break_on_an_upward_import(tmp_path):
    shutil.copytree(REPO / "ssam_tune", tmp_path / "ssam_tune", ignore=shutil.ignore_patterns("_data", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    r = _lint(tmp_path)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    optim = tmp_path / "ssam_tune" / "method" / "optim.py"
    optim.write_text(optim.read_text() + "\nfrom ssam_tune.tuning import space  # noqa: E402\n")
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "ssam_tune.method is not allowed to import ssam_tune.tuning" in r.stdout, r.stdout[-2000:]
    assert "ssam_tune.method.optim -> ssam_tune.tuning.space" in r.stdout
