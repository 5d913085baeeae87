"""No code execution from YAML or checkpoints; Ray's dashboard off; names stay in results/."""

import socket
from pathlib import Path

import pytest
import torch
from _helpers import FAST, run_module

from ssam_tune.training.trainer import load_checkpoint


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "payload": _Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_trainable_treats_evil_checkpoint_as_unreadable(tmp_path):
    from ssam_tune.tuning.trainable import _read

    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "payload": _Exploit(marker)}, tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint"):
        assert _read(tmp_path / "checkpoint.pt") is None
    assert not marker.exists()


def test_yaml_python_tags_never_run(tmp_path, monkeypatch, capsys):
    # both command lines, in process (tests/test_space.py runs refused files through the real
    # subprocesses): refused with exit code 2, and the tag's code never ran
    from ssam_tune import run, train

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "s.yaml").write_text(f"seed: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    for main in (run.main, train.run_cli):
        assert main([str(tmp_path / "s.yaml")]) == 2 and "!!python" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside", "/abs", "a/b", ".hidden"])
def test_experiment_name_cannot_escape_results(name, tmp_path):
    r = run_module("ssam_tune.run", str(FAST), "--name", name, "--dry-run", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "--name" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_local_ray_runs_without_dashboard():
    import ray

    from ssam_tune.tuning.tuner import init_ray

    init_ray(None)
    try:
        node = ray._private.worker.global_worker.node
        assert not node.address_info.get("webui_url")  # dashboard not started
        for host in ("127.0.0.1", node.node_ip_address):
            with socket.socket() as s:
                s.settimeout(1.0)
                assert s.connect_ex((host, 8265)) != 0  # nothing serves the dashboard port
    finally:
        ray.shutdown()
