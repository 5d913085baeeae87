"""Exports: the Pareto front, and a full export of a synthetic experiment folder (no Ray)."""

import csv
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ssam_tune.export import (
    confirm_cases,
    error_message,
    export_confirmation,
    export_experiment,
    load_trials,
    main,
    pareto_front,
    plot_front,
)
from ssam_tune.training.config import load_config
from ssam_tune.tuning.space import load_space, resolve_config


# ---------------------------------------------------------------------------------------------
# pareto_front
# ---------------------------------------------------------------------------------------------
def brute_front(points):
    """O(n^2) reference: indices of the points no other point dominates."""
    def dominates(q, p):
        return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])

    return sorted(i for i, p in enumerate(points) if not any(dominates(q, p) for q in points))


@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(0.5, 10.0)], [0]),
    ([(0.5, 1.0), (0.5, 1.0)], [0, 1]),  # identical points: all on the front
    ([(0.5, 1.0), (0.5, 2.0)], [0]),  # same accuracy, dearer: dominated
    ([(0.5, 1.0), (0.6, 1.0)], [1]),  # same cost, less accurate: dominated
    ([(0.1, 1.0), (0.2, 2.0), (0.15, 3.0), (0.3, 3.0), (0.3, 3.0)], [0, 1, 3, 4]),
    ([(0.9, 5.0), (0.1, 1.0), (0.5, 3.0)], [1, 2, 0]),  # sorted by cost
    ([(float("nan"), 1.0), (0.2, float("inf")), (0.1, 2.0), (None, 0.5)], [2]),  # non-finite: never
])
def test_pareto_front_hand_cases(points, expected):
    assert pareto_front(points) == expected


def test_pareto_front_matches_brute_force_on_random_points():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 25)
        # few distinct values: many ties in accuracy, in cost, and identical points
        points = [(rng.randint(0, 6) / 6, float(rng.randint(1, 6))) for _ in range(n)]
        got = pareto_front(points)
        assert sorted(got) == brute_front(points)
        assert [points[i][1] for i in got] == sorted(points[i][1] for i in got)


def test_error_message_picks_the_exception_line():
    text = ("Failure # 1 (occurred at 2026-01-01_00-00-00)\n"
            "ray::ImplicitFunc.train() (pid=1, ip=1.2.3.4, actor_id=x, repr=train_trial)\n"
            "  File \"/x/trainable.py\", line 10, in train_trial\n    raise RuntimeError('first')\n"
            "RuntimeError: first\n\n"
            "Failure # 2 (occurred at 2026-01-01_00-01-00)\n"
            "ray::ImplicitFunc.train() (pid=2, ip=1.2.3.4, actor_id=x, repr=train_trial)\n"
            "Traceback (most recent call last):\n  File \"/x/train.py\", line 5, in step\n    boom()\n"
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert error_message(text) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    actor = ("Failure # 1 (occurred at 2026-01-01_00-00-00)\nThe actor died unexpectedly before finishing "
             "this task.\n\tclass_name: ImplicitFunc\n\tpid: 12\n")
    assert error_message(actor) == "The actor died unexpectedly before finishing this task."


# ---------------------------------------------------------------------------------------------
# a synthetic experiment folder
# ---------------------------------------------------------------------------------------------
SPACE = {
    "name": "synth",
    "seed": 0,
    "model": {"name": "resnet18", "width": 0.125},
    "data": {"name": "embedded", "train_size": 256, "val_fraction": 0.1},
    "train": {"epochs": 4, "batch_size": 64},
    "method": {"name": "ssam_f", "rho": 0.1},
    "search": {
        "method.name": {"type": "choice", "values": ["sam", "ssam_f", "ssam_d"]},
        "method.rho": {"type": "loguniform", "low": 0.02, "high": 0.5},
        "method.sparsity": {"type": "uniform", "low": 0.5, "high": 0.99},
    },
    "tune": {"num_samples": 9, "objective": "multi", "flops": "theoretical", "seed": 3,
             "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
             "baselines": ["sgd", "sam", "ssam"], "confirm": {"top_k": 2, "seeds": [1, 2]}},
}
EPOCHS = 4
T0 = 1_800_000_000

# label: (kind, params, per-epoch cost, [val_acc per reported epoch], outcome)
TRIALS = {
    "sgd": ("baseline", {"method.name": "sgd"}, 100.0, [0.30, 0.40, 0.45, 0.50], "completed"),
    "sam": ("baseline", {"method.name": "sam"}, 200.0, [0.30, 0.45, 0.55, 0.60], "completed"),
    "ssam": ("baseline", {"method.name": "ssam_f", "method.sparsity": 0.5}, 175.0, [0.3, 0.4, 0.5, 0.55],
             "completed"),
    "optuna0": ("search", {"method.name": "ssam_f", "method.rho": 0.05, "method.sparsity": 0.9}, 150.0,
                [0.3, 0.5, 0.56, 0.58], "completed"),
    "optuna1": ("search", {"method.name": "ssam_d", "method.rho": 0.2, "method.sparsity": 0.7}, 162.5,
                [0.3, 0.4, 0.5, 0.52], "completed"),  # dominated by optuna0
    "optuna2": ("search", {"method.name": "ssam_f", "method.rho": 0.07, "method.sparsity": 0.9}, 150.0,
                [0.3, 0.5, 0.57, 0.58], "completed"),  # identical to optuna0: both on the front
    "optuna3": ("search", {"method.name": "sam", "method.rho": 0.3}, 200.0, [0.95], "pruned"),
    "optuna4": ("search", {"method.name": "ssam_f", "method.rho": 0.5, "method.sparsity": 0.6}, 120.0,
                [0.97, 0.99], "diverged"),
    "optuna5": ("search", {"method.name": "ssam_d", "method.rho": 0.1, "method.sparsity": 0.8}, 130.0,
                [0.98], "errored"),
    "optuna6": ("search", {"method.name": "sam", "method.rho": 0.04}, 200.0, [], "pending"),
    "optuna7": ("search", {"method.name": "ssam_f", "method.rho": 0.1, "method.sparsity": 0.95}, 110.0,
                [0.2, 0.3, 0.4, 0.45], "retried"),  # failed once, then completed: completed wins
}
EXPECTED_STATUS = {label: ("completed" if t[4] == "retried" else t[4]) for label, t in TRIALS.items()}
ERROR = ("Failure # 1 (occurred at 2026-11-27_10-00-00)\n"
         "ray::ImplicitFunc.train() (pid=42, ip=127.0.0.1, actor_id=abc, repr=train_trial)\n"
         "  File \"/x/ssam_tune/trainable.py\", line 120, in train_trial\n    for metrics in trainer.epochs():\n"
         "ValueError: synthetic failure in epoch 2\n")


def _result_row(tid, label, epoch, val, cost, status, number):
    return {"epoch": epoch, "train_loss": 2.0 - val, "train_acc": val, "val_loss": 2.0 - val, "val_acc": val,
            "test_loss": 2.1 - val, "test_acc": round(val - 0.01 * (number % 3), 6), "lr": 0.05 / epoch,
            "mask_density": 1.0, "mask_refreshes": epoch, "e_norm": 0.1, "epoch_seconds": 1.5,
            "images_per_second": 170.0, "flops_theoretical": cost * epoch, "flops_executed": cost * epoch * 1.1,
            "flops_mask": 0.0, "flops_steps_theoretical": cost * epoch, "flops_steps_executed": cost * epoch * 1.1,
            "best_val_acc": val, "best_epoch": epoch, "train_seconds": 1.5 * epoch, "status": status,
            "label": label, "timestamp": T0 + 100 * number + epoch, "training_iteration": epoch, "trial_id": tid,
            "date": f"2026-11-27_10-{number:02d}-{epoch:02d}", "time_total_s": 2.0 * epoch, "hostname": "node1"}


def write_trial(exp: Path, space, label, kind, params, cost, vals, outcome, number, epochs=EPOCHS, dirname=None):
    tid = f"{number:04d}{label[:4]}"
    meta = {"trial_id": tid, "label": label, "kind": kind, "anchor": kind == "baseline",
            "optuna_number": number - 3 if kind == "search" else None, "epochs": epochs, "exp_dir": str(exp)}
    if kind == "search":
        meta["params"] = params
    cfg = resolve_config(space.base, params)
    d = exp / (dirname or f"trial_{tid}")
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps({"ssam_tune": meta, "config": cfg}, sort_keys=True))
    rows = []
    for e, v in enumerate(vals, start=1):
        status = "completed" if e >= epochs and outcome in ("completed", "retried") else "running"
        rows.append(_result_row(tid, label, e, v, cost, status, number))
    if outcome == "diverged":  # the trainable repeats the last good epoch with status diverged; NaNs omitted
        last = dict(rows[-1], status="diverged")
        rows.append(last)
    if rows:
        text = "\n".join(json.dumps(r) for r in rows) + "\n"
        if outcome == "pruned":
            text += '{"epoch": 2, "val_acc": 0.9'  # a line cut short by a crash is skipped
        (d / "result.json").write_text(text)
    if outcome in ("errored", "retried"):
        (d / "error.txt").write_text(ERROR)
    return tid


def make_experiment(root: Path) -> tuple[Path, dict]:
    exp = root / "exp"
    exp.mkdir()
    (exp / "space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    (exp / "experiment_state-2026-11-27_09-59-00.json").write_text("{}")
    space = load_space(exp / "space.yaml")
    ids = {}
    for number, (label, (kind, params, cost, vals, outcome)) in enumerate(TRIALS.items()):
        ids[label] = write_trial(exp, space, label, kind, params, cost, vals, outcome, number)
    # the same trial seen twice (a second folder for optuna1, fewer results): listed once
    dup = exp / "train_trial_dup"
    dup.mkdir()
    src = exp / f"trial_{ids['optuna1']}"
    (dup / "params.json").write_text((src / "params.json").read_text())
    (dup / "result.json").write_text((src / "result.json").read_text().splitlines()[0] + "\n")
    (exp / "checkpoints" / ids["sgd"]).mkdir(parents=True)
    return exp, ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    exp, ids = make_experiment(root)
    out = root / "out"
    info = export_experiment(exp, out)
    return SimpleNamespace(exp=exp, ids=ids, out=out, info=info)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_trial_once_with_its_status(exported):
    ids, out, info = exported.ids, exported.out, exported.info
    rows = read_csv(out / "trials.csv")
    assert sorted(r["trial_id"] for r in rows) == sorted(ids.values())  # the duplicate folder is merged
    assert {r["label"]: r["status"] for r in rows} == EXPECTED_STATUS
    assert info["n_trials"] == len(TRIALS)
    assert info["counts"] == {"completed": 7, "pruned": 1, "diverged": 1, "errored": 1, "pending": 1}
    by = {r["label"]: r for r in rows}
    assert by["optuna5"]["error"] == "ValueError: synthetic failure in epoch 2"
    assert by["optuna7"]["failures"] == "1"  # retried and completed
    assert by["optuna3"]["epochs_reached"] == "1" and by["optuna4"]["epochs_reached"] == "2"
    # final, best-epoch and relative-cost columns; the flattened config
    assert float(by["sam"]["val_acc"]) == 0.60 and float(by["sam"]["flops_theoretical"]) == 800.0
    assert float(by["optuna0"]["flops_rel"]) == pytest.approx(1.5)
    assert float(by["sgd"]["flops_rel"]) == 1.0 and float(by["sgd"]["time_total_s"]) == 8.0
    assert by["optuna2"]["best_epoch"] == "4" and float(by["optuna2"]["best_val_acc"]) == 0.58
    for col in ("method.name", "method.rho", "method.sparsity", "method.T_m", "train.lr", "data.name", "seed",
                "test_acc_at_best", "flops_executed", "flops_mask", "train_seconds", "on_front", "dominated"):
        assert col in rows[0], col
    assert by["optuna1"]["method.name"] == "ssam_d" and float(by["optuna1"]["method.sparsity"]) == 0.7
    assert [r["label"] for r in rows[:3]] == ["sgd", "sam", "ssam"]


def test_load_trials_rows(exported):
    exp = exported.exp
    rows = load_trials(exp)
    assert len(rows) == len(TRIALS) and len({r["trial_id"] for r in rows}) == len(TRIALS)
    diverged = next(r for r in rows if r["label"] == "optuna4")
    assert diverged["status"] == "diverged" and [s["epoch"] for s in diverged["_series"]] == [1, 2]
    pending = next(r for r in rows if r["label"] == "optuna6")
    assert pending["epochs_reached"] == 0 and pending["val_acc"] is None and pending["flops_rel"] is None


def test_front_is_the_brute_force_front_of_completed_trials(exported):
    out, info = exported.out, exported.info
    rows = read_csv(out / "trials.csv")
    completed = [r for r in rows if r["status"] == "completed"]
    pts = [(float(r["val_acc"]), float(r["flops_theoretical"])) for r in completed]
    expected = {completed[i]["trial_id"] for i in brute_front(pts)}
    front = read_csv(out / "pareto.csv")
    assert {r["trial_id"] for r in front} == expected == set(info["front"])
    assert [r["label"] for r in front] == ["sgd", "optuna0", "optuna2", "sam"]  # ssam: dominated by optuna0
    assert [float(r["flops_theoretical"]) for r in front] == sorted(float(r["flops_theoretical"]) for r in front)
    for r in rows:
        assert (r["on_front"] == "true") == (r["trial_id"] in expected)
        if r["status"] == "completed":
            assert r["dominated"] == ("false" if r["trial_id"] in expected else "true")
        else:
            assert r["dominated"] == "" and r["on_front"] == "false"  # pruned/diverged/...: never
    pj = json.loads((out / "pareto.json").read_text())
    assert [p["trial_id"] for p in pj["front"]] == [r["trial_id"] for r in front]
    assert pj["cost"] == "flops_theoretical" and pj["accuracy"] == "val_acc"
    # key hyper-parameters: blank where they do not apply to the method
    sgd = next(r for r in front if r["label"] == "sgd")
    assert sgd["method"] == "sgd" and sgd["method.rho"] == "" and sgd["method.sparsity"] == ""
    assert float(next(r for r in front if r["label"] == "optuna0")["method.sparsity"]) == 0.9


def test_png_draws_exactly_the_front(exported):
    out, info = exported.out, exported.info
    front = read_csv(out / "pareto.csv")
    xs, ys = info["front_xy"]
    assert xs == [float(r["flops_rel"]) for r in front]  # x: multiples of SGD's FLOPs
    assert ys == [float(r["val_acc"]) for r in front]
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_front_absolute_cost_without_sgd(tmp_path, exported):
    exp = exported.exp
    rows = [r for r in load_trials(exp) if r["label"] != "sgd"]
    front = [r for r in rows if r["label"] in ("optuna0", "sam")]
    xs, ys = plot_front(rows, front, tmp_path / "p.png", title="t")
    assert xs == [600.0, 800.0] and ys == [0.58, 0.60]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_configs_run_as_they_are(exported):
    ids, out, info = exported.ids, exported.out, exported.info
    files = sorted((out / "configs").glob("*.yaml"))
    front = read_csv(out / "pareto.csv")
    assert [f.name for f in files] == sorted(Path(r["config"]).name for r in front)
    assert [Path(p).name for p in info["configs"]] == [Path(r["config"]).name for r in front]
    for f in files + [out / "best_config.yaml"]:
        cfg = load_config(f)
        assert cfg.train.epochs == EPOCHS
        assert f.read_text().startswith("# ")
    best = load_config(out / "best_config.yaml")
    assert best.method.name == "sam"  # the highest val_acc among COMPLETED trials (not the diverged 0.99)
    assert ids["sam"] in (out / "best_config.yaml").read_text().split("\n", 3)[1]
    opt0 = load_config(out / "configs" / "front_1_optuna0.yaml")
    assert (opt0.method.name, opt0.method.rho, opt0.method.sparsity) == ("ssam_f", 0.05, 0.9)


def test_summary(exported):
    ids, out = exported.ids, exported.out
    text = (out / "summary.md").read_text()
    for needle in ("validation accuracy", "test accuracy is only reported", "mode: search", "objective: multi",
                   "sampler: tpe (seed 3", "ASHA", "ValueError: synthetic failure in epoch 2", "## Pruned trials (1)",
                   "## Diverged trials (1)", "## Errored trials (1)", "## Provenance", "search seed: 3",
                   "torch", "optuna", "ray", "python", "CPUs", ids["sam"], "2026-11-27_09-59-00"):
        assert needle in text, needle


def test_export_is_idempotent_and_atomic(tmp_path, exported):
    exp, out = exported.exp, exported.out
    before = snapshot(out)
    export_experiment(exp, out)
    assert snapshot(out) == before
    assert not [p for p in out.rglob(".*")]  # no temporary files or folders left behind
    other = tmp_path / "again"
    export_experiment(exp, other)
    assert snapshot(other) == before


def test_tensorboard_runs_with_hparams(exported):
    from tensorboard.backend.event_processing.event_file_loader import (
        RawEventFileLoader,
    )
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, info = exported.out, exported.info
    runs = sorted(p for p in (out / "tensorboard").iterdir() if p.is_dir())
    assert len(runs) == len(TRIALS) == info["tensorboard_runs"]
    seen = set()
    for run in runs:
        files = list(run.glob("events.out.tfevents.*"))
        assert len(files) == 1
        scalars, hparams = {}, None
        for record in RawEventFileLoader(str(files[0])).Load():
            event = Event.FromString(record)
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams" and v.tag.endswith("session_start_info"):
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    hparams = data.session_start_info.hparams
                elif v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
        assert hparams is not None, run
        assert {"method.name", "label", "status"} <= set(hparams)
        # the run names the method (label alone for a baseline); tags are grouped ("accuracy/val")
        assert run.name.startswith(hparams["method.name"].string_value)
        if run.name.startswith("ssam_f-optuna0_"):
            assert hparams["method.name"].string_value == "ssam_f"
            assert hparams["method.sparsity"].number_value == pytest.approx(0.9)
            assert hparams["status"].string_value == "completed"
            assert [s for s, _ in scalars["accuracy/val"]] == [1, 2, 3, 4]
            assert scalars["final/accuracy/val"][0][1] == pytest.approx(0.58)
            assert {"final/accuracy/test", "final/cost/flops", "cost/flops_theoretical"} <= set(scalars)
            seen.add("optuna0")
        if run.name.startswith("sgd_"):
            assert hparams["method.rho"].number_value == -1  # does not apply to SGD: the sentinel, not a 0
            seen.add("sgd")
    assert seen == {"optuna0", "sgd"}  # both runs found under their names
    top = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(top) == 1  # the HParams experiment config (columns and metrics)


def test_confirmation(tmp_path, exported):
    exp, ids = exported.exp, exported.ids
    out = tmp_path / "out"
    export_experiment(exp, out)
    cases = confirm_cases(exp, 2, [1, 2])
    labels = [label for label, _ in cases]
    # top 2 front points by val_acc: sam (0.60, front index 3), then optuna0 (0.58, tied with optuna2: lower k)
    assert labels == ["front3_sam/seed1", "front3_sam/seed2", "front1_optuna0/seed1", "front1_optuna0/seed2"]
    assert [cfg["seed"] for _, cfg in cases] == [1, 2, 1, 2]
    assert cases[2][1]["method"]["sparsity"] == 0.9

    # a confirmation experiment: cases front3_sam and front1_optuna0 x seeds 1, 2, 3
    cexp = tmp_path / "confirm"
    cexp.mkdir()
    cspace = dict(SPACE, name="synth-confirm")
    cspace.pop("search")
    cspace["cases"] = [{"label": "front3_sam", "method": {"name": "sam"}}]
    cspace["seeds"] = [1, 2, 3]
    cspace["tune"] = {k: v for k, v in SPACE["tune"].items() if k not in ("num_samples", "baselines", "confirm")}
    (cexp / "space.yaml").write_text(yaml.safe_dump(cspace, sort_keys=False))
    space = load_space(cexp / "space.yaml")
    accs = {"front3_sam": [0.60, 0.62, 0.64], "front1_optuna0": [0.55, 0.59]}
    n = 20
    for label, vals in accs.items():
        for seed, acc in enumerate(vals, start=1):
            n += 1
            write_trial(cexp, space, f"{label}/seed{seed}", "case", {"seed": seed}, 100.0,
                        [0.3, 0.4, 0.5, acc], "completed", n)
    n += 1
    write_trial(cexp, space, "front1_optuna0/seed3", "case", {"seed": 3}, 100.0, [0.3], "pruned", n)
    res = export_confirmation(cexp, out)
    rows = {r["label"]: r for r in read_csv(out / "confirm.csv")}
    assert list(rows) == ["front1_optuna0", "front3_sam"]
    sam = rows["front3_sam"]
    assert sam["n_seeds"] == "3" and sam["seeds"] == "1;2;3"
    assert float(sam["val_acc_mean"]) == pytest.approx(0.62)
    assert float(sam["val_acc_std"]) == pytest.approx(0.02)  # sample std (ddof 1)
    assert float(sam["search_val_acc"]) == 0.60 and sam["search_trial_id"] == ids["sam"]
    o = rows["front1_optuna0"]
    assert o["n_seeds"] == "2" and o["n_trials"] == "3" and "pruned" in o["not_completed"]
    assert float(o["val_acc_std"]) == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert len(res["rows"]) == 2
    text = (out / "summary.md").read_text()
    assert text.count("## Confirmation") == 1 and "front3_sam" in text
    # refreshing either export keeps exactly one confirmation section
    export_confirmation(cexp, out)
    export_experiment(exp, out)
    text = (out / "summary.md").read_text()
    assert text.count("## Confirmation") == 1 and text.rstrip().endswith("-->")


def test_single_objective_still_gets_a_front(tmp_path):
    root = tmp_path
    space = dict(SPACE, tune=dict(SPACE["tune"], objective="single", flops="executed"))
    exp = root / "exp"
    exp.mkdir()
    (exp / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    s = load_space(exp / "space.yaml")
    for number, label in enumerate(("sgd", "sam", "optuna0", "optuna1")):
        kind, params, cost, vals, outcome = TRIALS[label]
        write_trial(exp, s, label, kind, params, cost, vals, outcome, number)
    info = export_experiment(exp, root / "out")
    front = read_csv(root / "out" / "pareto.csv")
    assert "flops_executed" in front[0]  # the cost column is the space's flops_metric
    assert [r["label"] for r in front] == ["sgd", "optuna0", "sam"] and info["best_trial"] == front[-1]["trial_id"]
    assert "still computed" in (root / "out" / "summary.md").read_text()


def test_cli_errors_and_success(tmp_path, capsys, exported, monkeypatch):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "space.yaml" in capsys.readouterr().err
    exp = exported.exp
    monkeypatch.chdir(tmp_path)
    assert main([str(exp)]) == 0
    assert (tmp_path / "results" / "synth" / "pareto.csv").is_file()  # default: results/<space name>


def test_optuna_journal_is_joined_and_left_untouched(tmp_path):
    import optuna

    from ssam_tune.tuning.study import open_study

    exp, ids = make_experiment(tmp_path)
    study = open_study(str(exp / "optuna.journal"), "synth", "multi")
    trial = study.ask()
    trial.set_user_attr("ray_trial_id", ids["optuna0"])
    trial.set_user_attr("status", "completed")
    study.tell(trial.number, [0.58, 600.0])
    lost = study.ask()  # a trial the killed driver never handed to Ray
    lost.set_user_attr("ray_trial_id", "gone1234")
    lost.set_user_attr("status", "orphaned")
    study.tell(lost.number, state=optuna.trial.TrialState.FAIL)
    before = snapshot(exp)
    export_experiment(exp, tmp_path / "out")
    assert snapshot(exp) == before  # the experiment is read-only input
    rows = {r["label"]: r for r in read_csv(tmp_path / "out" / "trials.csv")}
    assert rows["optuna0"]["optuna_status"] == "completed" and rows["sgd"]["optuna_status"] == ""
    assert "#1 (orphaned)" in (tmp_path / "out" / "summary.md").read_text()


def test_importing_the_exports_does_not_import_ray():
    import subprocess
    import sys

    code = ('import ssam_tune.export, sys; assert "ray" not in sys.modules and '
            '"ssam_tune.tuning.search" not in sys.modules, '
            'sorted(m for m in sys.modules if "ray" in m or "search" in m)')
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr


def test_confirmation_accepts_a_uri(tmp_path, exported):
    pytest.importorskip("pyarrow")
    exp = exported.exp
    uri = exp.as_uri()  # file://...: read through Experiment.fetch_small_files, as s3://... is
    assert confirm_cases(uri, 2, [1, 2]) == confirm_cases(exp, 2, [1, 2])
    # the search experiment stands in for a confirmation one: only the file handling matters here
    export_confirmation(exp, tmp_path / "local")
    export_confirmation(uri, tmp_path / "uri")
    assert (tmp_path / "uri" / "confirm.csv").read_bytes() == (tmp_path / "local" / "confirm.csv").read_bytes()
    assert f"(experiment folder `{uri}`)" in (tmp_path / "uri" / "summary.md").read_text()
    with pytest.raises(FileNotFoundError):
        export_confirmation((tmp_path / "missing").as_uri(), tmp_path / "uri")


def test_uri_experiment_reads_its_journal_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    from ssam_tune.storage import experiment
    from ssam_tune.tuning.study import open_study

    monkeypatch.setattr(experiment, "JOURNAL_CACHE", tmp_path / "cache")
    exp, ids = make_experiment(tmp_path)
    uri = exp.as_uri()
    journal = Path(experiment.Experiment(uri).journal_path())  # a URI's journal lives outside the folder
    study = open_study(str(journal), "synth", "multi")
    trial = study.ask()
    trial.set_user_attr("ray_trial_id", ids["optuna0"])
    trial.set_user_attr("status", "completed")
    study.tell(trial.number, [0.58, 600.0])
    assert not (exp / "optuna.journal").exists()
    export_experiment(uri, tmp_path / "out")
    rows = {r["label"]: r for r in read_csv(tmp_path / "out" / "trials.csv")}
    assert rows["optuna0"]["optuna_status"] == "completed"
    assert f"Experiment folder `{uri}`" in (tmp_path / "out" / "summary.md").read_text()


def test_pruned_trials_are_drawn_at_their_full_runs_cost():
    """pareto.png: a trial stopped at epoch 6 of 12 after spending 0.9x SGD's full-run cost
    sits at 1.8x, never left of trials it could not have beaten at that cost."""
    from ssam_tune.export.plot import plotted_cost

    pruned = {"status": "pruned", "flops_theoretical": 9.0, "epochs_reached": 6, "train.epochs": 12}
    done = {"status": "completed", "flops_theoretical": 9.0, "epochs_reached": 12, "train.epochs": 12}
    assert plotted_cost(pruned, "flops_theoretical", 10.0) == pytest.approx(1.8)
    assert plotted_cost(done, "flops_theoretical", 10.0) == pytest.approx(0.9)
    assert plotted_cost(pruned, "flops_theoretical", None) == pytest.approx(18.0)
    assert plotted_cost({**pruned, "epochs_reached": 0}, "flops_theoretical", 10.0) is None
