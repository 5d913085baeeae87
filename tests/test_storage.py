"""Object storage end to end, against a real S3-compatible server (moto's standalone server,
started here on a free port; pyarrow and Ray reach it through ``AWS_ENDPOINT_URL``).

A search on ``s3://``: the driver is SIGKILLed mid-search, then resumed with ``--resume auto``
from another working directory and an empty HOME (a replaced head node, which has neither
the first driver's files nor its Optuna journal), with the confirmation step on; then the
experiment is exported again from its URI on a third "machine". Nothing lost, nothing
duplicated, and the study is the one of this experiment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from _helpers import fast_space, kill_group, read_rows, reap_session, run_module, start_driver, wait_for, write_yaml

BUCKET = "ssam-tune-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3(monkeypatch, tmp_path):
    """A moto S3 server on localhost with one bucket; the AWS variables point every client
    (pyarrow, Ray, boto3) at it. Yields the bucket's ``s3://`` URI."""
    port = _free_port()
    log = open(tmp_path / "moto.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        import boto3

        client = boto3.client("s3")

        def up():
            try:
                client.create_bucket(Bucket=BUCKET)
                return True
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        assert wait_for(up, 60, 0.5), (tmp_path / "moto.log").read_text()[-2000:]
        yield f"s3://{BUCKET}"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()


def _listing(uri: str) -> dict[str, int]:
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (OSError, FileNotFoundError):
        return {}
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == fs.FileType.File}


def _read(uri: str) -> bytes:
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as src:
        return src.read()


def _trial_errors(exp_uri: str) -> str:
    """Every trial's error.txt in the experiment (the end of each), for a failure message."""
    errors = [f for f in _listing(exp_uri) if f.endswith("/error.txt")]
    return "\n".join(f"{f}:\n{_read(f'{exp_uri}/{f}').decode(errors='replace')[-1500:]}" for f in errors)


def _output(out: str | bytes | None) -> str:
    return (out.decode(errors="replace") if isinstance(out, bytes) else out or "")[-3000:]


def test_search_on_s3_killed_then_resumed_on_a_new_head(s3, tmp_path, monkeypatch):
    from ssam_tune.tuning.study import open_study

    space = fast_space()
    space["tune"]["sampler"] = "random"  # a resumed driver must not replay the killed one's proposals
    space["tune"].pop("n_startup_trials")
    space["tune"]["confirm"] = {"top_k": 1, "seeds": [1]}
    storage = f"{s3}/runs"
    exp_uri = f"{storage}/fast"
    head1, head2, reader = (tmp_path / d for d in ("head1", "head2", "reader"))
    for d in (head1, head2, reader):
        (d / "home").mkdir(parents=True)
    write_yaml(head1 / "fast.yaml", space)
    write_yaml(head2 / "fast.yaml", space)
    args = ["fast.yaml", "--storage", storage, "--resume", "auto"]

    # -- head 1: start the search, SIGKILL the driver once a few trials have reported ----------
    monkeypatch.setenv("HOME", str(head1 / "home"))
    driver = start_driver(args, head1, head1 / "driver.log")

    def mid_search():
        files = _listing(exp_uri)
        reported = [f for f, size in files.items() if f.endswith("/result.json") and size]
        return "optuna.journal" in files and any(f.startswith("searcher-state") for f in files) \
            and len(reported) >= 4

    try:
        assert wait_for(mid_search, 600, 1.0), (head1 / "driver.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        kill_group(driver)
        reap_session(driver.pid)
    assert "--resume auto: starting" in (head1 / "driver.log").read_text()

    # -- the exists-guard holds for a URI -------------------------------------------------------
    monkeypatch.setenv("HOME", str(head2 / "home"))
    r = run_module("ssam_tune.run", "fast.yaml", "--storage", storage, cwd=head2, timeout=300)
    assert r.returncode == 2 and "already exists at s3://" in r.stderr, r.stderr[-2000:]

    # -- head 2: another working directory, an empty HOME -----------------------------------------
    assert not any((head2 / "home").rglob("*.journal"))
    try:  # (within the test's own timeout, so that the driver's output is shown)
        r = run_module("ssam_tune.run", *args, cwd=head2, timeout=540)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the resumed driver did not finish:\n{_output(err.stdout)}\n{_output(err.stderr)}\n"
                    f"{_trial_errors(exp_uri)}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + _trial_errors(exp_uri)
    assert "--resume auto: resuming" in r.stdout

    trials = read_rows(head2 / "results" / "fast" / "trials.csv")
    ids = [t["trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == 9, ([t["label"] for t in trials], r.stdout[-3000:])  # 6 sampled + 3 anchors
    assert all(t["status"] in ("completed", "pruned") for t in trials), \
        "\n".join([str([(t["label"], t["status"], t["error"]) for t in trials]), r.stdout[-3000:], r.stderr[-3000:],
                   _trial_errors(exp_uri)])

    # the study travelled with the experiment: it holds head 1's trials and is closed
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(_read(f"{exp_uri}/optuna.journal"))
    study = open_study(str(journal), "fast", "multi")
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in study.trials)
    sampled = [t for t in study.trials if t.user_attrs.get("kind") == "search"]
    assert len([t for t in sampled if t.state.name != "FAIL"]) == 6
    assert len([t for t in study.trials if t.user_attrs.get("kind") == "baseline"]) == 3
    proposed = [tuple(sorted(t.params.items())) for t in sampled]
    assert len(proposed) == len(set(proposed)), proposed
    by_id = {t["trial_id"]: t for t in trials}
    for t in study.trials:  # every study trial that Ray ran is the trial trials.csv describes
        row = by_id.get(t.user_attrs.get("ray_trial_id"))
        if row is not None and t.state.name != "FAIL":
            assert row["status"] == t.user_attrs["status"]
    front = {r["trial_id"] for r in read_rows(head2 / "results" / "fast" / "pareto.csv")}
    assert {t.user_attrs["ray_trial_id"] for t in study.best_trials} == front

    # the confirmation step ran on the URI too
    confirm = read_rows(head2 / "results" / "fast" / "confirm.csv")
    assert confirm and all(int(row["n_seeds"]) == 1 and not row["not_completed"] for row in confirm), confirm
    assert "fast-confirm/tuner.pkl" in _listing(storage)

    # -- a third machine exports from the URI alone: the same trials ------------------------------
    monkeypatch.setenv("HOME", str(reader / "home"))
    r = run_module("ssam_tune.export", exp_uri, "--out", str(reader / "out"), cwd=reader, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = read_rows(reader / "out" / "trials.csv")
    assert [(t["trial_id"], t["status"], t["val_acc"]) for t in again] == \
        [(t["trial_id"], t["status"], t["val_acc"]) for t in trials]
    assert (reader / "out" / "summary.md").read_text().count("optuna") > 0
