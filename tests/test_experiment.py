"""The experiment folder: atomic writes, local folders and URIs through one interface, and
no other module testing for ``"://"``."""

import re
from pathlib import Path

import pytest
from _helpers import REPO, run_module

from ssam_tune import experiment as X
from ssam_tune.experiment import Experiment, atomic_write, is_uri, resolve_storage

PACKAGE = Path(X.__file__).parent


def test_atomic_write_text_bytes_and_writer(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    atomic_write(p, "one")
    assert p.read_text() == "one"
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    atomic_write(p, lambda fh: fh.write(b"three"), fsync=True)
    assert p.read_bytes() == b"three"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]  # no temporary file left


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write(p, "old")

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_storage_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("results/ray") == str(tmp_path / "results" / "ray")
    assert resolve_storage("s3://bucket/prefix/") == "s3://bucket/prefix"
    exp = Experiment.at("s3://bucket/prefix/", "exp1")
    assert exp.root == "s3://bucket/prefix/exp1" and exp.name == "exp1" and not exp.is_local
    assert exp.checkpoint_dir("t1") is None and exp.join("space.yaml") == "s3://bucket/prefix/exp1/space.yaml"
    assert is_uri("file:///x") and not is_uri("/x") and not is_uri(None)
    with pytest.raises(ValueError, match="not a local folder"):
        exp.path  # noqa: B018 - the property raises


def test_local_experiment(tmp_path):
    exp = Experiment.at(str(tmp_path), "e")
    assert not exp.exists() and not exp.started
    exp.make()
    exp.write_text(X.SPACE_FILE, "name: e\n")
    assert exp.read_text(X.SPACE_FILE) == "name: e\n" and exp.read_text("missing") is None
    assert exp.journal_path() == str(tmp_path / "e" / X.JOURNAL_FILE)
    assert exp.checkpoint_dir("t1") == tmp_path / "e" / X.CHECKPOINTS_DIR / "t1"
    (tmp_path / "e" / X.TUNER_FILE).write_bytes(b"x")
    assert exp.started
    assert exp.fetch_small_files(tmp_path / "unused") == tmp_path / "e"


def test_uri_experiment_through_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setattr(X, "JOURNAL_CACHE", tmp_path / "cache")
    root = tmp_path / "store"
    exp = Experiment.at(f"file://{root}", "e")
    assert not exp.exists(X.SPACE_FILE) and not exp.started
    exp.write_text(X.SPACE_FILE, "name: e\n")
    assert (root / "e" / X.SPACE_FILE).read_text() == "name: e\n"
    assert exp.exists(X.SPACE_FILE) and exp.read_text(X.SPACE_FILE) == "name: e\n"
    # the journal of a URI experiment is local, keyed by the whole URI: two storages that
    # hold an experiment of the same name do not share a study
    other = Experiment.at(f"file://{tmp_path / 'elsewhere'}", "e")
    assert exp.journal_path() != other.journal_path()
    assert Path(exp.journal_path()).parent == tmp_path / "cache"
    # the exports' copy: small files only, never checkpoints; the journal from the cache
    (root / "e" / "trial_1" / "checkpoint_000000").mkdir(parents=True)
    (root / "e" / "trial_1" / "checkpoint_000000" / "checkpoint.pt").write_bytes(b"big")
    (root / "e" / "trial_1" / "result.json").write_text("{}\n")
    (root / "e" / "experiment_state-2026.json").write_text("{}")
    Path(exp.journal_path()).parent.mkdir(parents=True)
    Path(exp.journal_path()).write_text("journal")
    got = exp.fetch_small_files(tmp_path / "copy")
    files = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert files == ["experiment_state-2026.json", X.JOURNAL_FILE, X.SPACE_FILE, "trial_1/result.json"]


def test_no_other_module_tests_for_a_scheme():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name != "experiment.py" and re.search(r"""["']://["']""", path.read_text()):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, offenders


def test_unreachable_storage_is_one_line_exit_2(tmp_path):
    space = REPO / "search_spaces" / "quickstart.yaml"
    r = run_module("ssam_tune.run", str(space), "--storage", "nosuchscheme://b/p", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--storage: cannot reach nosuchscheme://b/p/quickstart" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
