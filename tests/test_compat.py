"""Old module paths (ssam_tune/_compat.py): the flat layout's imports and pickles resolve, and
an experiment written by the release before the layer folders (79462fa) resumes and exports.

The fixture tests/fixtures/experiment_79462fa.tar.gz was made by
tests/fixtures/make_experiment_79462fa.py with that commit's code: a search whose driver was
SIGKILLed after its first trial finished, so the resume unpickles tuner.pkl (MOASHA,
RungStateCallback, Progress, LiveTensorBoard, PruneCheckpoints, the trial-name functions)
and the searcher state (SsamSearcher, SearchSpace) by their old module paths.
"""

import importlib
import json
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from _helpers import HERE, read_rows, run_module
from filelock import FileLock

from ssam_tune import _compat

FIXTURE = HERE / "fixtures" / "experiment_79462fa.tar.gz"
# Ray keeps the storage path of the trials that were pending when the driver died, so the
# experiment resumes only where it was written (make_experiment_79462fa.ROOT).
ROOT = Path("/tmp/ssam-tune-79462fa")


# every module of 79462fa -> its public names then (__all__, else what it defined), recorded
# from that commit: each must still resolve through the old path, or be a documented removal
API_79462FA = json.loads((HERE / "fixtures" / "api_79462fa.json").read_text())


@pytest.mark.parametrize("old", sorted(API_79462FA))
def test_every_public_name_of_79462fa_resolves(old):
    module = importlib.import_module(old)
    for name in API_79462FA[old]:
        if f"{old}.{name}" in _compat.REMOVED:
            with pytest.raises(AttributeError, match="; use "):
                getattr(module, name)
            continue
        obj = getattr(module, name)
        home = getattr(obj, "__module__", None)
        if old in _compat.MOVED_MODULES and isinstance(home, str) and home.startswith("ssam_tune."):
            assert home == importlib.import_module(home).__name__  # the real object
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


@pytest.mark.parametrize("old", sorted(_compat.MOVED_MODULES))
def test_old_module_paths_give_the_new_objects(old):
    new = importlib.import_module(_compat.MOVED_MODULES[old])
    module = importlib.import_module(old)
    for name in getattr(new, "__all__", []):
        assert getattr(module, name) is getattr(new, name), (old, name)


@pytest.mark.parametrize("old", sorted(_compat.MOVED_NAMES))
def test_moved_names_unpickle(old):
    module, name = old.rsplit(".", 1)
    new_module, new_name = _compat.MOVED_NAMES[old].split(":")
    target = getattr(importlib.import_module(new_module), new_name)
    # what pickle does with a global written under the old path (protocol 0: "c<module>\n<name>\n.")
    assert pickle.loads(f"c{module}\n{name}\n.".encode()) is target


def test_old_paths_imported_before_torch():
    """A stand-in answers attribute lookups lazily; torch's import scans sys.modules (hasattr
    __file__) and must not trigger the import of a half-imported module."""
    code = ("from ssam_tune import data, models, distributed, fisher; import torch; "
            "import ssam_tune.optim as o; assert fisher.fisher_scores and o.SSAM and data.load_dataset")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


def test_real_modules_are_never_shadowed_and_the_package_uses_no_old_path():
    import ssam_tune.run
    import ssam_tune.train

    assert hasattr(ssam_tune.run, "main") and hasattr(ssam_tune.train, "run_cli")
    assert all(not old.startswith(("ssam_tune.run", "ssam_tune.export")) for old in _compat.MOVED_MODULES)
    # import-linter cannot see imports of modules that exist only in the table
    old = "|".join(m.removeprefix("ssam_tune.") for m in _compat.MOVED_MODULES)
    pattern = re.compile(rf"(?:from|import)\s+ssam_tune\.(?:{old})\b|from\s+ssam_tune\s+import\s+(?:{old})\b")
    package = HERE.parent / "ssam_tune"
    users = [str(f.relative_to(package)) for f in package.rglob("*.py")
             if f.name != "_compat.py" and pattern.search(f.read_text())]
    assert not users, users


@pytest.mark.e2e
def test_experiment_written_by_79462fa_resumes_and_exports(tmp_path):
    with FileLock(str(ROOT) + ".lock"):
        shutil.rmtree(ROOT, ignore_errors=True)
        ROOT.mkdir(parents=True)
        with tarfile.open(FIXTURE) as tar:
            tar.extractall(ROOT, filter="data")
        (ROOT / "ray").mkdir()
        (ROOT / "old").rename(ROOT / "ray" / "old")
        exp = ROOT / "ray" / "old"
        before = {d.name for d in exp.glob("trial_*")}
        before_lines = {d.name: len((d / "result.json").read_text().splitlines()) for d in exp.glob("trial_*")}
        r = run_module("ssam_tune.run", "old.yaml", "--storage", "ray", "--results", ".", "--resume", cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rows = read_rows(ROOT / "old" / "trials.csv")
        # the space's budget: the SGD anchor and 3 sampled trials, each once, none lost or errored
        assert len(rows) == len({row["trial_id"] for row in rows}) == 4
        assert {row["status"] for row in rows} <= {"completed", "pruned"}, [row["status"] for row in rows]
        assert before <= {f"trial_{row['trial_id']}" for row in rows}
        # a trial that was running when the driver died continued from its checkpoint
        resumed = []
        for name in before:
            lines = [json.loads(x) for x in (exp / name / "result.json").read_text().splitlines()]
            resumed += [x for x in lines[before_lines[name]:] if x.get("resumed_from")]
        assert resumed, "no trial of the killed driver resumed from a checkpoint"
        # the exports rebuilt by the export command agree with the ones the run wrote
        r = run_module("ssam_tune.export", str(exp), "--out", str(tmp_path / "again"), cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "again" / "trials.csv").read_bytes() == (ROOT / "old" / "trials.csv").read_bytes()
        shutil.rmtree(ROOT, ignore_errors=True)
