"""A trivial function trainable: the search machinery without training.

Used by ``bench_load.py``, ``bench_scale.py``, ``bench_disk.py`` and the load tests
(``tests/_trivial.py`` imports it and adds a trainable that raises).

``trivial_trainable`` receives what :func:`ssam_tune.tuning.trainable.train_trial` receives
(``{"ssam_tune": bookkeeping, "config": full training config}``) and reports, every epoch,
the metrics the searcher, ASHA and the exports read, with deterministic fake numbers:

- ``val_acc`` is a smooth function of the sampled hyper-parameters (best near rho = 0.1,
  falling with the sparsity, a small offset per method), rising over the epochs, so TPE
  has a signal and ASHA has something to rank;
- the FLOPs follow the method's cost model (SGD 1x, SAM 2x, sparse SAM 1 + (1 - sparsity)
  per step, SSAM-F plus a mask cost);
- ``train_seconds`` is the trial's own measured time (a few milliseconds).

It never sleeps beyond ~1 ms per epoch and writes no checkpoint (``checkpointing_trainable``
does). Ray workers import this module by name, so it imports nothing but the standard
library at the top (a worker's start-up is part of what the benchmarks time), and this
folder must be on the workers' ``PYTHONPATH``: :func:`_search_common.fresh_ray_env`.
"""

from __future__ import annotations

import math
import os
import time

SPARSE = ("ssam_f", "ssam_d", "ssam_random")
FLOPS_PER_EPOCH = 1.0e12  # one SGD epoch, arbitrary units
BASELINES = ["sgd", "sam", "ssam"]
METHOD_OFFSET = {"sgd": -0.03, "sam": 0.0, "ssam_f": 0.004, "ssam_d": 0.002, "ssam_random": -0.01}
CKPT_BYTES_ENV = "SSAM_BENCH_CKPT_BYTES"  # checkpointing_trainable's checkpoint size (bytes)


def final_accuracy(method: dict) -> float:
    name = method.get("name", "sgd")
    acc = 0.80 + METHOD_OFFSET.get(name, 0.0)
    if name != "sgd":
        rho = max(float(method.get("rho", 0.1)), 1e-6)
        acc += 0.05 * math.exp(-(math.log(rho / 0.1) ** 2) / 2.0)  # best near rho = 0.1
    if name in SPARSE:
        s = float(method.get("sparsity", 0.5))
        acc -= 0.06 * s ** 4  # little loss until the sparsity gets high
    return acc


def flops_per_epoch(method: dict) -> tuple[float, float, float]:
    """(theoretical, executed, mask) FLOPs of one epoch."""
    name = method.get("name", "sgd")
    if name == "sgd":
        factor = 1.0
    elif name == "sam":
        factor = 2.0
    else:
        factor = 1.0 + (1.0 - float(method.get("sparsity", 0.5)))
    mask = 0.02 * FLOPS_PER_EPOCH if name == "ssam_f" else 0.0
    theoretical = factor * FLOPS_PER_EPOCH + mask
    executed = (2.0 if name != "sgd" else 1.0) * FLOPS_PER_EPOCH + mask  # dense masked steps
    return theoretical, executed, mask


def trivial_reports(config: dict):
    """The per-epoch results of ``trivial_trainable`` (a generator: one dict per epoch)."""
    start = time.perf_counter()
    meta = config.get("ssam_tune", {})
    cfg = config["config"]
    epochs = int(cfg["train"]["epochs"])
    method = cfg.get("method", {})
    final = final_accuracy(method)
    th, ex, mask = flops_per_epoch(method)
    best_acc, best_epoch = -1.0, 0
    for e in range(1, epochs + 1):
        time.sleep(0.001)
        val = final * (1.0 - 0.5 ** (e + 1)) / (1.0 - 0.5 ** (epochs + 1))
        test = val - 0.01
        if val > best_acc:
            best_acc, best_epoch, test_at_best = val, e, test
        yield {
            "epoch": e, "val_acc": val, "test_acc": test,
            "flops_theoretical": th * e, "flops_executed": ex * e, "flops_mask": mask * e,
            "train_seconds": time.perf_counter() - start,
            "status": "completed" if e == epochs else "running",
            "best_val_acc": best_acc, "best_epoch": best_epoch, "test_acc_at_best": test_at_best,
            "label": meta.get("label", ""),
        }


def trivial_trainable(config: dict) -> None:
    from ray import tune

    for metrics in trivial_reports(config):
        tune.report(metrics)


def checkpointing_trainable(config: dict) -> None:
    """``trivial_trainable``'s reports, each with a checkpoint of ``$SSAM_BENCH_CKPT_BYTES``
    bytes (default 1 MiB) of random data: disk measurements without the training."""
    import tempfile

    from ray import tune

    size = int(os.environ.get(CKPT_BYTES_ENV, 1 << 20))
    for metrics in trivial_reports(config):
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "checkpoint.bin"), "wb") as fh:
                fh.write(os.urandom(size))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def load_space_dict(name: str, num_samples: int, *, scheduler="asha", baselines=BASELINES,
                    concurrency: int = 4, cpu: float = 0.5, epochs: int = 4) -> dict:
    """A search space like tests/spaces/fast.yaml, sized for load runs."""
    return {
        "name": name, "seed": 0,
        "model": {"name": "resnet18", "width": 0.0625},
        "data": {"name": "embedded", "train_size": 256, "val_fraction": 0.1},
        "train": {"epochs": epochs, "batch_size": 64},
        "method": {"name": "ssam_f", "rho": 0.1, "N_F": 16},
        "search": {
            "method.name": {"type": "choice", "values": ["sam", "ssam_f", "ssam_d"]},
            "method.rho": {"type": "loguniform", "low": 0.02, "high": 0.5},
            "method.sparsity": {"type": "uniform", "low": 0.5, "high": 0.95},
            "method.N_F": {"type": "choice", "values": [8, 16]},
        },
        "tune": {
            "num_samples": num_samples, "objective": "multi", "n_startup_trials": 10,
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2} if scheduler == "asha" else "none",
            "baselines": list(baselines) or False,
            "resources": {"cpu": cpu},  # 4 x 0.5 CPU: four trials at a time on a 2-core machine
            "max_concurrent_trials": concurrency,
        },
    }
