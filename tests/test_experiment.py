"""The experiment folder: atomic writes, local folders and URIs through one interface, and
no other module testing for ``"://"``."""

import re
from pathlib import Path

import pytest
from _helpers import REPO, write_ray_state

from ssam_tune.storage import experiment as X
from ssam_tune.storage.experiment import Experiment, resolve_storage
from ssam_tune.storage.files import atomic_write, is_uri

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
        if path.name != "files.py" and re.search(r"""["']://["']""", path.read_text()):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, offenders


def test_unreachable_storage_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from ssam_tune.run import main

    monkeypatch.chdir(tmp_path)
    space = REPO / "search_spaces" / "quickstart.yaml"
    assert main([str(space), "--storage", "nosuchscheme://b/p"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--storage: cannot reach nosuchscheme://b/p/quickstart" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["local", "file_uri"])
def test_delete_checkpoints_of_a_trial(tmp_path, where):
    root = tmp_path / "e"
    for trial in ("a", "b"):
        for i in (3, 4, 10):
            (root / f"trial_{trial}" / f"checkpoint_{i:06d}").mkdir(parents=True)
            (root / f"trial_{trial}" / f"checkpoint_{i:06d}" / "checkpoint.pt").write_bytes(b"x")
        (root / f"trial_{trial}" / "result.json").write_text("{}\n")
    (root / "checkpoints" / "a").mkdir(parents=True)
    (root / "checkpoints" / "a" / "checkpoint.pt").write_bytes(b"own")
    exp = Experiment(str(root) if where == "local" else f"file://{root}")
    assert exp.trial_checkpoints("a") == [f"trial_a/checkpoint_{i:06d}" for i in (3, 4, 10)]
    assert exp.delete_checkpoints("a", keep_newest=True) == 2
    assert sorted(d.name for d in (root / "trial_a").iterdir()) == ["checkpoint_000010", "result.json"]
    assert exp.delete_checkpoints("b") == 3
    assert sorted(d.name for d in (root / "trial_b").iterdir()) == ["result.json"]
    if where == "local":  # the trial's own copy (local storage only)
        assert not (root / "checkpoints" / "a").exists()
    assert exp.trial_checkpoints("missing") == []


@pytest.mark.parametrize("where", ["local", "file_uri"])
def test_trial_statuses_of_the_newest_stored_state(tmp_path, where):
    root = tmp_path / "e"
    root.mkdir()
    exp = Experiment(str(root) if where == "local" else f"file://{root}")
    assert exp.trial_statuses() == {} and exp.state_file() is None
    write_ray_state(root, {"a": "RUNNING", "b": "PENDING"}, stamp="2026-12-01_10-00-00")
    write_ray_state(root, {"a": "TERMINATED", "b": "RUNNING", "c": "ERROR"}, stamp="2026-12-01_11-00-00")
    assert exp.state_file() == "experiment_state-2026-12-01_11-00-00.json"  # the one Ray restores
    assert exp.trial_statuses() == {"a": "TERMINATED", "b": "RUNNING", "c": "ERROR"}


def test_prune_callback_waits_for_the_stored_state(tmp_path):
    """A finished trial's checkpoints go only once Ray's experiment state on the storage says
    it is finished. The reproduction of a resume that failed: the killed driver's upload
    left this callback's state newer than the experiment state (which still had both trials
    running, restored from checkpoint_000001); the resumed driver deleted that checkpoint and
    Ray's restore of the trials failed ("does not exist on storage anymore")."""
    from types import SimpleNamespace

    from ssam_tune.tuning.retention import PruneCheckpoints

    root = tmp_path / "e"
    for trial in ("pruned", "done"):
        for i in (1, 2):
            (root / f"trial_{trial}" / f"checkpoint_{i:06d}").mkdir(parents=True)
    write_ray_state(root, {"pruned": "RUNNING", "done": "RUNNING"}, stamp="2026-12-01_10-00-00")
    cb = PruneCheckpoints(Experiment(str(root)), epochs=4)
    cb.on_trial_complete(0, [], SimpleNamespace(trial_id="pruned", last_result={"epoch": 2, "status": "running"}))
    cb.on_trial_complete(0, [], SimpleNamespace(trial_id="done", last_result={"epoch": 4, "status": "completed"}))
    state = cb.get_state()
    state = cb.get_state()  # snapshots written, none stored yet
    restored = PruneCheckpoints(Experiment(str(root)), epochs=4)
    restored.set_state(state)  # a resumed driver restores the stored experiment state
    restored.get_state()
    assert len(list(root.glob("trial_*/checkpoint_*"))) == 4
    write_ray_state(root, {"pruned": "TERMINATED", "done": "TERMINATED"}, stamp="2026-12-01_10-00-05")
    restored._next_check = 0.0  # (the stored state is read again at most ~5% of the time)
    assert restored.get_state() == {"finished": []}
    assert sorted(str(p.relative_to(root)) for p in root.glob("trial_*/checkpoint_*")) == \
        ["trial_done/checkpoint_000002"]


def test_resumed_trial_restored_from_the_newest_checkpoint_left(tmp_path):
    """Ray deleted the checkpoint a killed driver's stored state points at (keep_checkpoints,
    before the next state was uploaded): the trial is restored from the newest one left."""
    from types import SimpleNamespace

    from pyarrow import fs
    from ray import tune

    from ssam_tune.tuning.retention import RestoreFromNewest

    for i in (3, 4):
        (tmp_path / "trial_a" / f"checkpoint_{i:06d}").mkdir(parents=True)

    def recorded(name):  # a trial's latest_checkpoint_result, as Ray restored it
        path = str(tmp_path / "trial_a" / name)
        return SimpleNamespace(checkpoint=tune.Checkpoint(path, filesystem=fs.LocalFileSystem()))

    gone, there = recorded("checkpoint_000002"), recorded("checkpoint_000003")
    trials = [SimpleNamespace(trial_id="a", status="PENDING", latest_checkpoint_result=gone),
              SimpleNamespace(trial_id="b", status="PENDING", latest_checkpoint_result=there),
              SimpleNamespace(trial_id="c", status="PENDING", latest_checkpoint_result=None)]
    RestoreFromNewest().on_step_begin(0, trials)
    assert gone.checkpoint.path == str(tmp_path / "trial_a" / "checkpoint_000004")
    assert there.checkpoint.path == str(tmp_path / "trial_a" / "checkpoint_000003")  # left as recorded
