"""A synthetic search experiment in the folder layout Ray Tune 2.60 writes, without Ray.

Used by ``bench_scale.py`` (a), the export of a 2,000-trial experiment, and by the tests
(tests/test_scale.py, tests/_helpers.py), which find it through pytest's ``pythonpath``
setting in pyproject.toml: one copy of Ray's layout for both.

:func:`write_experiment` writes what ``python -m ssam_tune.run`` leaves in
``<storage>/<name>/`` for a multi-objective search (copied from real experiments, key order
included):

- ``space.yaml`` (``space_to_dict``) and ``optuna.journal`` (every trial, through Optuna's
  own journal storage, with the searcher's user attributes and the study's outcomes);
- ``experiment_state-<date>.json``: Ray's ``trial_data``, one ``[trial JSON, runtime JSON]``
  pair of strings per trial, of the real entries' size (~50 KB: Ray keeps pickled blobs,
  the config twice, the last result, ``metric_analysis`` and ``metric_n_steps`` per metric);
- ``trial_<id>/params.json`` (sorted keys, indent 2) and ``trial_<id>/result.json``: one Ray
  result line per epoch, the Trainer's metrics in its order, then Ray's bookkeeping and the
  whole trial config; ``error.txt`` for an errored trial; a pending trial has no results.

Trials: the SGD, SAM and SSAM anchors (completed), then sampled ones, ``optuna<k>``, stopped
at the rungs ``grace * rf**j`` with probability ``1 - 1/rf`` each (pruned), else completed;
about 1% diverge (a last report repeating the last good epoch with ``status: diverged``), 1%
error (``error.txt``), 0.5% never report (pending). Deterministic for a given ``seed``.
Returns the truth the exports must show: per trial id its label, status, epochs reached and
final val_acc / flops_theoretical.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

HOST, NODE_IP = "node-1", "192.0.2.2"
T0 = 1796000000  # first timestamp of the experiment (seconds)


def space_dict(name: str, n_sampled: int, epochs: int, grace: int, rf: int) -> dict:
    return {
        "name": name, "seed": 0,
        "model": {"name": "resnet18", "width": 0.25},
        "data": {"name": "embedded", "val_fraction": 0.1},
        "train": {"epochs": epochs, "batch_size": 128},
        "method": {"name": "ssam_f", "rho": 0.1, "N_F": 128},
        "search": {
            "method.name": {"type": "choice", "values": ["sam", "ssam_f", "ssam_d"]},
            "method.rho": {"type": "loguniform", "low": 0.01, "high": 0.5},
            "method.sparsity": {"type": "uniform", "low": 0.5, "high": 0.95, "step": 0.05},
            "method.T_m": {"type": "int", "low": 1, "high": 10},
            "method.N_F": {"type": "choice", "values": [16, 128, 512]},
        },
        "tune": {"num_samples": n_sampled, "objective": "multi", "sampler": "random",
                 "scheduler": {"type": "mo_asha", "grace_period": grace, "reduction_factor": rf},
                 "resources": {"cpu": 4, "gpu": 0.5}, "max_concurrent_trials": 8},
    }


def _blob(rng: random.Random, n_bytes: int) -> dict:
    """A pickled object as Ray stores it in JSON (hex)."""
    return {"_type": "CLOUDPICKLE_FALLBACK", "value": "8005" + "".join(f"{rng.getrandbits(8):02x}"
                                                                      for _ in range(n_bytes - 2))}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _curve(final: float, e: int, epochs: int) -> float:
    return final * (1.0 - 0.5 ** (1 + 8 * e / epochs)) / (1.0 - 0.5 ** 9)


def _reports(rng: random.Random, label: str, cfg: dict, n_epochs: int, epochs: int, outcome: str,
             per_epoch_flops: float, final_acc: float) -> list[dict]:
    """The Trainer's per-epoch reports (before Ray adds its keys)."""
    sparse = cfg["method"]["name"] in ("ssam_f", "ssam_d")
    out, best, best_e, test_best, seconds = [], -1.0, 0, 0.0, 0.0
    for e in range(1, n_epochs + 1):
        val = _curve(final_acc, e, epochs) + rng.uniform(-0.004, 0.004)
        test = val - 0.01 + rng.uniform(-0.003, 0.003)
        if val > best:
            best, best_e, test_best = val, e, test
        dt = rng.uniform(20.0, 22.0)
        seconds += dt
        r = {"epoch": e, "train_loss": 2.3 * math.exp(-3 * e / epochs), "train_acc": min(1.0, val + 0.1),
             "val_loss": 2.2 * math.exp(-2 * e / epochs), "val_acc": val, "test_loss": 2.2 * math.exp(-2 * e / epochs),
             "test_acc": test, "lr": 0.05 * 0.5 * (1 + math.cos(math.pi * e / epochs)),
             "mask_density": 1.0 - cfg["method"]["sparsity"] if sparse else 1.0}
        if sparse:
            r["mask_overlap"] = rng.uniform(0.5, 0.7)
        r.update({"mask_refreshes": e // cfg["method"]["T_m"] if sparse else 0, "e_norm": rng.uniform(0.05, 0.1),
                  "epoch_seconds": dt, "images_per_second": 45000 / dt,
                  "flops_theoretical": per_epoch_flops * e, "flops_executed": 2 * 6.8e14 * e,
                  "flops_mask": 1.4e13 * e if cfg["method"]["name"] == "ssam_f" else 0.0,
                  "flops_steps_theoretical": per_epoch_flops * e * 0.98, "flops_steps_executed": 2 * 6.7e14 * e,
                  "best_val_acc": best, "best_epoch": best_e, "test_acc_at_best": test_best, "train_seconds": seconds,
                  "status": "completed" if e == epochs else "running", "label": label, "device": "cuda",
                  "node_id": "a85e3c9a49360f4df9677696f67aed61454e9bbdbd0e8fb7ce724c34", "resumed_from": 0})
        out.append(r)
    if outcome == "diverged":
        last = dict(out[-1]) if out else {"epoch": 0}
        last["status"] = "diverged"
        out.append(last)
    return out


def _ray_line(report: dict, i: int, tid: str, config: dict, t: float, dt: float) -> dict:
    row = dict(report)
    row.update({"timestamp": int(t), "checkpoint_dir_name": f"checkpoint_{i - 1:06d}", "should_checkpoint": True,
                "done": False, "training_iteration": i, "trial_id": tid,
                "date": f"2026-11-30_{(int(t) // 3600) % 24:02d}-{(int(t) // 60) % 60:02d}-{int(t) % 60:02d}",
                "time_this_iter_s": dt, "time_total_s": dt * i, "pid": 26594, "hostname": HOST, "node_ip": NODE_IP,
                "config": config, "time_since_restore": dt * i, "iterations_since_restore": i})
    return row


def _state_entry(rng: random.Random, tid: str, config: dict, last: dict | None, status: str) -> list[str]:
    """Ray's [trial JSON, runtime JSON] for one trial, field names and sizes as Ray 2.60 writes them."""
    trial = {"stub": False, "trainable_name": "train_trial", "trial_id": tid, "storage": _blob(rng, 840),
             "config": config, "_Trial__unresolved_config": config, "evaluated_params": _flat(config),
             "experiment_tag": "_".join(f"{k}={v}" for k, v in _flat(config).items())[:800],
             "stopping_criterion": {}, "_setup_default_resource": True, "_default_placement_group_factory": None,
             "placement_group_factory": _blob(rng, 180), "log_to_file": [None, None], "max_failures": 0,
             "_default_result_or_future": None, "export_formats": [], "status": status,
             "relative_logdir": f"trial_{tid}", "trial_name_creator": _blob(rng, 845),
             "trial_dirname_creator": _blob(rng, 640), "custom_trial_name": f"{config['ssam_tune']['label']}_{tid}",
             "custom_dirname": f"trial_{tid}", "restore_path": None, "_restore_checkpoint_result": None,
             "_state_json": None, "results": "__removed__", "extra_arg": None, "_resources": None}
    numeric = {k: v for k, v in (last or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    runtime = {"start_time": float(T0), "num_failures": int(status == "ERROR"), "num_failures_after_restore": 0,
               "error_filename": "error.txt" if status == "ERROR" else None, "pickled_error_filename": None,
               "last_result": last or {}, "last_result_time": float(T0),
               "metric_analysis": {k: {"max": v, "min": v, "avg": v, "last": v, "last-5-avg": v, "last-10-avg": v}
                                   for k, v in numeric.items()},
               "_n_steps": [5, 10], "metric_n_steps": {k: {"5": _blob(rng, 40), "10": _blob(rng, 60)} for k in numeric},
               "checkpoint_manager": _blob(rng, 4700)}
    return [json.dumps(trial, indent=2), json.dumps(runtime, indent=2)]


ERROR_TEXT = ("Failure # 1 (occurred at 2026-11-30_10-00-00)\n"
              "ray::ImplicitFunc.train() (pid=1, ip=192.0.2.2, actor_id=x, repr=train_trial)\n"
              "Traceback (most recent call last):\n  File \"/x/train.py\", line 5, in step\n    boom()\n"
              "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")


def write_experiment(exp: Path, n_trials: int, *, epochs: int = 200, grace: int = 50, rf: int = 3,
                     seed: int = 0, name: str = "scale") -> dict:
    """Write an ``n_trials``-trial experiment (3 anchors + sampled) into ``exp``; see the module doc."""
    import optuna
    import yaml

    from ssam_tune.tuning.space import load_space, milestones, resolve_config, sample_params, space_to_dict
    from ssam_tune.tuning.study import objective_values, open_study, record

    rng = random.Random(seed)
    exp.mkdir(parents=True, exist_ok=True)
    space = load_space(exp / "space.yaml", data=space_dict(name, n_trials - 3, epochs, grace, rf))
    (exp / "space.yaml").write_text(yaml.safe_dump(space_to_dict(space), sort_keys=False))
    study = open_study(str(exp / "optuna.journal"), name, "multi", "flops_theoretical",
                       sampler=optuna.samplers.RandomSampler(seed=seed))
    rungs = milestones(grace, rf, epochs)
    truth = {"label": {}, "status": {}, "epochs_reached": {}, "val_acc": {}, "flops_theoretical": {}}
    entries = []
    t = float(T0)
    fixed = space.fixed_trials()
    for k in range(n_trials):
        tid = f"{rng.getrandbits(32):08x}"
        meta = {"trial_id": tid, "exp_dir": str(exp), "epochs": epochs}
        if k < len(fixed):
            label, cfg = fixed[k]
            meta.update(kind="baseline", label=label, anchor=True, optuna_number=None)
            outcome, n_epochs = "completed", epochs
            trial = None
        else:
            trial = study.ask()
            params = sample_params(space, trial)
            trial.set_user_attr("ray_trial_id", tid)
            trial.set_user_attr("kind", "search")
            cfg = resolve_config(space.base, params)
            label = f"optuna{trial.number}"
            meta.update(kind="search", label=label, anchor=False, optuna_number=trial.number, params=params)
            n_epochs = next((m for m in rungs if rng.random() > 1.0 / rf), epochs)
            outcome = "completed" if n_epochs == epochs else "pruned"
            u = rng.random()
            if u < 0.01:
                outcome, n_epochs = "diverged", rng.randint(0, n_epochs - 1)
            elif u < 0.02:
                outcome, n_epochs = "errored", rng.randint(0, n_epochs - 1)
            elif u < 0.025:
                outcome, n_epochs = "pending", 0
        config = {"ssam_tune": meta, "config": cfg}
        m = cfg["method"]
        factor = {"sgd": 1.0, "sam": 2.0}.get(m["name"], 2.0 - m["sparsity"])
        per_epoch = factor * 6.8e14
        final_acc = 0.93 + {"sgd": 0.0, "sam": 0.01}.get(m["name"], 0.012 - 0.03 * m["sparsity"] ** 4) \
            + 0.005 * math.exp(-(math.log(m["rho"] / 0.1) ** 2))
        reports = _reports(rng, label, cfg, n_epochs, epochs, outcome, per_epoch, final_acc)
        folder = exp / f"trial_{tid}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        lines = []
        dt = 21.0
        for i, r in enumerate(reports, 1):
            t += dt / 8  # eight trials at a time
            lines.append(json.dumps(_ray_line(r, i, tid, config, t, dt)))
        if outcome != "pending":
            (folder / "result.json").write_text("".join(line + "\n" for line in lines))
        if outcome == "errored":
            (folder / "error.txt").write_text(ERROR_TEXT)
        last = json.loads(lines[-1]) if lines else None
        entries.append(_state_entry(rng, tid, config, last, "ERROR" if outcome == "errored" else "TERMINATED"))
        reached = max((r["epoch"] for r in reports), default=0)
        values = objective_values("multi", reports[-1], "flops_theoretical") if reports else None
        if trial is not None:
            record(study, trial.number, outcome, reached, values)
        else:
            study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, values=values,
                user_attrs={"ray_trial_id": tid, "kind": "baseline", "label": label, "status": "completed",
                            "baseline": {"method.name": m["name"]}}))
        truth["label"][tid] = label
        truth["status"][tid] = outcome
        truth["epochs_reached"][tid] = reached
        truth["val_acc"][tid] = reports[-1]["val_acc"] if reports else None
        truth["flops_theoretical"][tid] = reports[-1]["flops_theoretical"] if reports else None
    state = {"trial_data": entries, "runner_data": {"_iteration": 4 * n_trials, "_reuse_actors": True},
             "stats": {"start_time": float(T0)}}
    (exp / "experiment_state-2026-11-30_10-00-00.json").write_text(json.dumps(state))  # Ray: no indent
    return truth
