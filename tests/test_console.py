"""What a person reads in the terminal: the progress lines of a search and its end report."""

from pathlib import Path
from types import SimpleNamespace

from _helpers import fast_space, write_yaml

from ssam_tune.export.summary import SGD_DOMINATES, console_text
from ssam_tune.tuning.progress import Progress
from ssam_tune.tuning.space import load_space


def trial(tid, label, anchor=False, status="RUNNING"):
    return SimpleNamespace(trial_id=tid, status=status, last_result={},
                           config={"ssam_tune": {"label": label, "anchor": anchor}})


def test_progress_prints_one_line_per_result_and_per_end(capsys):
    p = Progress(epochs=4, cost_metric="flops_theoretical")
    p.setup()
    sgd, sam, cut, bad = trial("a", "sgd", anchor=True), trial("b", "sam", anchor=True), trial("c", "optuna0"), \
        trial("d", "optuna1")
    trials = [sgd, sam, cut, bad]
    p.on_trial_result(0, trials, sam, {"epoch": 1, "val_acc": 0.2, "flops_theoretical": 20.0})  # before SGD
    for e in range(1, 5):
        p.on_trial_result(0, trials, sgd, {"epoch": e, "val_acc": 0.1 * e, "flops_theoretical": 10.0 * e})
    sgd.status = "TERMINATED"
    p.on_trial_complete(0, trials, sgd)
    p.on_trial_result(0, trials, cut, {"epoch": 1, "val_acc": 0.15, "flops_theoretical": 15.0})
    p.on_trial_complete(0, trials, cut)
    p.on_trial_result(0, trials, bad, {"epoch": 2, "val_acc": 0.0, "status": "diverged"})
    p.on_trial_complete(0, trials, bad)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 4 + 1 + 2 + 1
    assert lines[0].endswith("sam           epoch 1/4   val_acc 0.200   cost 20")
    assert lines[4].endswith("sgd           epoch 4/4   val_acc 0.400   cost 1.00x SGD")
    assert "sgd           completed   val_acc 0.400   cost 1.00x SGD   | 1 completed, 0 pruned, 0 failed, " \
           "3 running" in lines[5]
    assert lines[6].endswith("optuna0       epoch 1/4   val_acc 0.150   cost 1.50x SGD")
    assert "stopped early at epoch 1/4 (pruned)   | 1 completed, 1 pruned, 0 failed" in lines[7]
    assert "optuna1       diverged (NaN/inf loss) in epoch 3   | 1 completed, 1 pruned, 1 failed" in lines[8]


def test_progress_counts_trials_of_the_budget_and_estimates_the_time_left(capsys, monkeypatch):
    """6 epochs run in 60 s of a budget of 3 trials x 4 epochs, 1 skipped by a pruned trial:
    5 epochs left, ~50 s; the SGD anchor's cost and the counts survive a resume (the
    callback's state), the pace restarts with the new driver."""
    import ssam_tune.tuning.progress as P

    clock = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    p = Progress(epochs=4, cost_metric="flops_theoretical", budget=3)
    p.setup()
    sgd, cut = trial("a", "sgd", anchor=True), trial("b", "optuna0")
    for e in range(1, 4):
        p.on_trial_result(0, [sgd, cut], sgd, {"epoch": e, "val_acc": 0.1, "flops_theoretical": 10.0 * e})
    for e in range(1, 4):
        p.on_trial_result(0, [sgd, cut], cut, {"epoch": e, "val_acc": 0.1, "flops_theoretical": 15.0 * e})
    clock[0] = 60.0
    p.on_trial_complete(0, [sgd, cut], cut)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.endswith("(pruned)   | 1 of 3 done: 0 completed, 1 pruned, 0 failed, 1 running; ~50 s left at most"), \
        line
    again = Progress(epochs=4, cost_metric="flops_theoretical", budget=3)
    again.set_state(p.get_state())
    again.setup()
    clock[0] = 100.0
    again.on_trial_result(0, [sgd], sgd, {"epoch": 4, "val_acc": 0.2, "flops_theoretical": 40.0})
    sgd.status = "TERMINATED"
    again.on_trial_complete(0, [sgd], sgd)
    line = capsys.readouterr().out.splitlines()[-1]
    # 6 epochs run and 1 skipped before the resume, 1 run since in 40 s: 4 left, 160 s
    assert line.endswith("completed   val_acc 0.200   cost 1.00x SGD   | 2 of 3 done: 1 completed, 1 pruned, 0 failed; "
                         "~2.7 min left at most"), line


def test_end_report_names_the_front_the_best_and_the_next_commands(tmp_path):
    space = load_space(write_yaml(tmp_path / "s.yaml", fast_space()))
    row = {"kind": "baseline", "label": "sgd", "trial_id": "a", "status": "completed", "method.name": "sgd",
           "val_acc": 0.5, "test_acc": 0.49, "flops_theoretical": 1e12, "flops_rel": 1.0}
    pruned = {**row, "kind": "search", "label": "optuna0", "trial_id": "b", "status": "pruned"}
    out = Path("results/fast")
    text = console_text(space, [row, pruned], [row], row, [], out, "results/ray/fast/optuna.journal")
    assert "== fast: 2 trials: 1 completed, 1 pruned" in text
    assert "best (val_acc): sgd [sgd] val_acc 50.00%, test_acc 49.00%, 1.00x SGD" in text
    assert " 1.00x SGD  val_acc 50.00%  test_acc 49.00%  sgd [sgd]" in text
    assert "note: " + SGD_DOMINATES in text  # a front of SGD alone says so
    assert "python -m ssam_tune.train results/fast/best_config.yaml --out runs/fast-best" in text
    assert "tensorboard --logdir results/fast/tensorboard" in text
    assert "optuna-dashboard results/ray/fast/optuna.journal" in text
    two = {**row, "kind": "search", "label": "optuna1", "trial_id": "c", "val_acc": 0.6, "flops_rel": 1.5,
           "method.name": "sam"}
    text = console_text(space, [row, two], [row, two], two, [], out, None)
    assert SGD_DOMINATES not in text and "optuna-dashboard" not in text
    front = text.split("cheapest first:")[1]
    assert front.index(" 1.00x SGD  val_acc") < front.index(" 1.50x SGD  val_acc")


def test_front_costs_print_with_the_decimals_that_separate_them():
    from ssam_tune.export.summary import separating_digits

    assert separating_digits([1.0, 1.447, 1.454, 2.0]) == 3  # 1.45 and 1.45 at two decimals
    assert separating_digits([1.0, 1.5, 2.0]) == 2
    assert separating_digits([1.0, 1.00001, 1.00002]) == 4  # at most four
    assert separating_digits([]) == 2


def test_a_sampled_trials_line_names_its_method(capsys):
    p = Progress(epochs=4, cost_metric="flops_theoretical")
    p.setup()
    t = trial("e", "optuna2")
    t.config["config"] = {"method": {"name": "ssam_f"}}
    anchor = trial("f", "sam")
    anchor.config["config"] = {"method": {"name": "sam"}}
    p.on_trial_result(0, [t, anchor], t, {"epoch": 1, "val_acc": 0.2, "flops_theoretical": 20.0})
    p.on_trial_result(0, [t, anchor], anchor, {"epoch": 1, "val_acc": 0.2, "flops_theoretical": 20.0})
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith("optuna2 ssam_f epoch 1/4   val_acc 0.200   cost 20")
    assert second.endswith("sam           epoch 1/4   val_acc 0.200   cost 20")  # the label says it already
