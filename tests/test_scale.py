"""Scale: the export of a generated N-trial experiment (Ray's layout, benchmarks/_search_experiment.py)
is correct, the streaming readers agree with plain ones, and MO-ASHA's fast rung rule is the
reference rule. No timing here: benchmarks/bench_scale.py measures the 2,000-trial case."""

import csv
import json
import math
import random

import pytest
from _search_experiment import write_experiment

from ssam_tune.export import export_experiment, load_trials
from ssam_tune.export.read import RAY_KEYS, _parsed_trial_ids, _state_trial_ids
from ssam_tune.tuning.ranking import _ranks_2d, crowding_distances, nondominated_ranks, promote

N = 60


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    exp = root / "ray" / "scale"
    truth = write_experiment(exp, N, epochs=12, grace=3, rf=3, seed=3)
    info = export_experiment(exp, root / "out")
    return exp, root / "out", truth, info


def test_every_generated_trial_exported_with_its_status(generated):
    exp, out, truth, info = generated
    with open(out / "trials.csv", newline="") as fh:
        rows = {r["trial_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(truth["status"]) and info["n_trials"] == N
    for tid, row in rows.items():
        assert row["status"] == truth["status"][tid], (tid, row["label"])
        assert int(row["epochs_reached"]) == truth["epochs_reached"][tid]
        if truth["val_acc"][tid] is not None and row["val_acc"]:
            assert float(row["val_acc"]) == truth["val_acc"][tid]
    assert info["tensorboard_runs"] == N


def test_front_is_the_brute_force_front(generated):
    exp, out, truth, info = generated
    done = [(truth["val_acc"][t], truth["flops_theoretical"][t], t) for t, s in truth["status"].items()
            if s == "completed"]
    front = {t for a, c, t in done if not any(b >= a and d <= c and (b, d) != (a, c) for b, d, _ in done)}
    assert set(info["front"]) == front


def _reference_rows(path):
    """Plain reading: every line of result.json, whole; the newest per epoch."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    by_epoch = {r["epoch"]: r for r in lines if isinstance(r.get("epoch"), int) and r["epoch"] >= 1}
    return lines, [by_epoch[e] for e in sorted(by_epoch)]


def test_series_keeps_every_metric_and_no_bookkeeping(generated):
    exp, out, truth, info = generated
    shown = RAY_KEYS - {"best_val_acc", "best_epoch", "time_total_s"}  # what TensorBoard does not plot
    for row in load_trials(exp):
        path = exp / f"trial_{row['trial_id']}" / "result.json"
        if not path.is_file():
            assert row["_series"] == []
            continue
        lines, per_epoch = _reference_rows(path)
        assert len(row["_series"]) == len(per_epoch)
        for got, full in zip(row["_series"], per_epoch, strict=True):
            want = {k: v for k, v in full.items() if k in ("epoch", "timestamp") or (
                k not in shown and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))}
            assert got == want and list(got) == list(want)  # same keys, same values, same order
            assert not {"config", "date", "hostname", "pid", "node_ip", "time_this_iter_s"} & set(got)
        dates = sorted(r["date"] for r in lines)
        assert (row["date_first"], row["date_last"]) == ((dates[0], dates[-1]) if dates else (None, None))
        assert row["hostname"] == (lines[-1]["hostname"] if lines else None)


def test_state_file_ids_found_without_parsing_it(generated):
    exp = generated[0]
    state = next(exp.glob("experiment_state-*.json"))
    ids = _state_trial_ids(state)
    assert ids == _parsed_trial_ids(state) and len(ids) == N


@pytest.mark.parametrize("chunk", [1 << 22, 997])
def test_state_file_statuses_found_without_parsing_it(generated, monkeypatch, chunk):
    from ssam_tune.storage import experiment

    exp = generated[0]
    data = json.loads(next(exp.glob("experiment_state-*.json")).read_text())
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    monkeypatch.setattr(experiment, "_STATE_CHUNK", chunk)  # keys cut by chunk boundaries too
    assert experiment.Experiment(str(exp)).trial_statuses() == {t["trial_id"]: t["status"] for t in trials}


def test_fast_promote_is_the_reference_rule():
    def reference(recorded, new, rf):
        if len(new) == 1:  # Ray's ASHA cutoff: the (1 - 1/rf) quantile, numpy's "linear" method
            if not recorded:
                return True
            v = sorted(p[0] for p in recorded)
            pos = (1 - 1 / rf) * (len(v) - 1)
            a, b, t = v[math.floor(pos)], v[math.ceil(pos)], pos - math.floor(pos)
            return new[0] >= (a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t))
        points = [tuple(p) for p in recorded] + [tuple(new)]
        ranks = nondominated_ranks(points)
        crowd = crowding_distances(points, ranks)
        me = len(points) - 1

        def further(x, y):  # equal within a relative 1e-9 (ranking.py's tolerance)
            return x > y and not math.isclose(x, y, rel_tol=1e-9)

        ahead = sum(1 for j in range(me)
                    if ranks[j] < ranks[me] or (ranks[j] == ranks[me] and further(crowd[j], crowd[me])))
        return ahead <= len(points) / rf

    rng = random.Random(0)
    for _ in range(2000):
        dims, q = rng.choice([1, 2]), rng.choice([2, 5, 1000])  # few distinct values: many ties
        recorded = [tuple(rng.randint(0, q) / q for _ in range(dims)) for _ in range(rng.randint(0, 25))]
        new = tuple(rng.randint(0, q) / q for _ in range(dims))
        rf = rng.choice([2, 3, 4])
        assert _ranks_2d(recorded + [new]) == nondominated_ranks(recorded + [new])
        assert promote(recorded, new, rf) == reference(recorded, new, rf), (recorded, new, rf)
