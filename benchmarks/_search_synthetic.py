"""A synthetic Sparse-SAM learning-curve model with a known answer, as a table for ``bench_replay.py``.

:func:`write_table` writes the model's curves over a product grid of the searched keys
(:data:`GRID`), three noise seeds per config, in the table format of
``benchmarks/curves/README.md``: the same input ``bench_replay.py`` takes for the real curves
of ``make_curves.py``. The model was the search benchmark's only ground truth before the real
curves existed; ``bench_replay.py --synthetic PATH`` checks that a strategy chosen on the real
curves does not lose to random search on it.

The model and its assumptions (numbers loosely after Mi et al. 2022, Table 1, ResNet-18 on
CIFAR-10, where SAM gains ~0.8 points over SGD and SSAM keeps most of it up to high sparsity):

- **Final accuracy** (noise-free, validation): SGD 0.940. A perturbing method adds a gain
  ``G(rho)``: at most 0.8 points at its best rho, a log-normal bump that fades to 0 as rho -> 0
  and turns into a loss for rho well above the best (SAM at rho = 0.5 ends below SGD).
- **Sparse methods** keep a fraction ``q = 1 - k s^3`` of that gain at sparsity ``s``: with a
  good mask they lose 4% of it at 50%, 23% at 90%, 31% at 99% (the paper's losses are a little
  smaller at 50%; a gentler curve gives a front that keeps rising up to 2x), with
  ``k = 0.32 + 0.5 (1 - m)`` larger for a worse mask (quality ``m``). Their best rho grows a little with the sparsity
  (``0.1 (1 + s/2)``): a perturbation confined to fewer weights tolerates a larger radius.
- **Mask quality** ``m``: SSAM-F (Fisher) improves with N_F (``1 - 0.35 exp(-N_F/48)``: 0.75 at
  16 samples, 0.98 at 128) and loses a little to a stale mask (up to 0.05 at T_m = 20);
  SSAM-D (dynamic) is at most 0.9, best near alpha = 0.45. So SSAM-F with many Fisher samples
  is the more accurate sparse method at a given sparsity, but it pays for its mask.
- **Cost per epoch** (theoretical, in SGD epochs): SGD 1, SAM 2, sparse ``1 + (1 - s)`` (the
  paper's idealisation: only the first backward is sparse); SSAM-F adds its mask,
  ``0.02 (N_F / 128) / T_m`` (0.02 at the paper's default N_F 128, T_m 1; 0.08 at N_F 512).
  Executed FLOPs (dense hardware) are 2 for every perturbing method, plus the mask.
  ``train_seconds`` is synthetic too: 20 s per executed SGD-epoch of FLOPs.
- **Learning curves** (a cosine-annealed run): ``final - 0.2 (1 - x)^1.3 - lag (1 - x)`` at
  progress ``x = epoch / epochs``. Perturbing methods start slower: ``lag = 0.016 sqrt(rho /
  0.1)`` for SAM, times ``0.7 + 0.5 s^2`` for a sparse method (a perturbation on fewer weights
  is larger per weight, and the mask of an untrained network is poor), and catch up as the
  learning rate anneals. At a third of the run SAM is behind SGD although it finishes 0.8
  points ahead, and high-sparsity trials are behind dense ones although they finish close:
  accuracy-only early stopping is fooled, by construction, as the case MO-ASHA targets.
- **Noise**, deterministic given the config and its ``seed`` (the benchmark's noise seed):
  a per-trial offset (sd 0.10 points, the seed-to-seed spread of a trained network) and
  per-epoch jitter (sd 0.06 points at the end, 0.86 points at the start: evaluations in the
  high-learning-rate phase swing). Test accuracy is the validation curve 0.3 points lower
  with its own jitter.

The ground truth of a table is its configs' final values averaged over the seeds
(``bench_replay.Truth``).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json

import numpy as np

SPARSE = ("ssam_f", "ssam_d")
FLOPS_PER_EPOCH = 1.0e15  # theoretical FLOPs of one SGD epoch (arbitrary units)
SECONDS_PER_EPOCH = 20.0  # synthetic seconds per executed SGD-epoch of FLOPs

SGD_ACC = 0.940
GAIN_MAX = 0.008
RHO_BEST = 0.1

# The space the model was written for (the grid below samples it).
SPACE = {
    "method.name": ["sam", "ssam_f", "ssam_d"],
    "method.rho": (0.02, 0.5),  # loguniform
    "method.sparsity": (0.2, 0.99),  # uniform
    "method.N_F": [16, 64, 128, 512],
    "method.T_m": [1, 2, 5, 10, 20],
    "method.alpha": (0.1, 0.9),  # uniform
}


# -- the noise-free model (numpy: scalars or arrays alike) -----------------------------------
def rho_gain(rho, best):
    """The accuracy a perturbation of radius ``rho`` adds (best radius ``best``)."""
    u = np.log(np.asarray(rho, dtype=float) / best)
    left = GAIN_MAX * np.exp(-u ** 2 / (2 * 0.9 ** 2))
    right = GAIN_MAX * np.exp(-u ** 2 / (2 * 0.7 ** 2)) - 0.002 * u ** 2
    return np.where(u <= 0, left, right)


def mask_quality_f(n_f, t_m):
    return 1.0 - 0.35 * np.exp(-np.asarray(n_f, dtype=float) / 48.0) - 0.05 * np.log(t_m) / np.log(20.0)


def mask_quality_d(alpha):
    return 0.9 - 0.4 * (np.asarray(alpha, dtype=float) - 0.45) ** 2


def sparse_gain(rho, s, quality):
    s = np.asarray(s, dtype=float)
    kept = 1.0 - (0.32 + 0.5 * (1.0 - quality)) * s ** 3
    return rho_gain(rho, RHO_BEST * (1.0 + 0.5 * s)) * kept


def mask_cost(n_f, t_m):
    """SSAM-F's mask, in SGD epochs per epoch."""
    return 0.02 * (np.asarray(n_f, dtype=float) / 128.0) / np.asarray(t_m, dtype=float)


def final_accuracy(method: dict) -> float:
    """Noise-free final validation accuracy of a config's ``method`` section."""
    name = method["name"]
    if name == "sgd":
        return SGD_ACC
    rho = float(method["rho"])
    if name == "sam":
        return float(SGD_ACC + rho_gain(rho, RHO_BEST))
    s = float(method["sparsity"])
    q = mask_quality_f(method["N_F"], method["T_m"]) if name == "ssam_f" else mask_quality_d(method["alpha"])
    return float(SGD_ACC + sparse_gain(rho, s, q))


def cost_per_epoch(method: dict) -> tuple[float, float, float]:
    """(theoretical, executed, mask) cost of one epoch, in SGD epochs."""
    name = method["name"]
    mask = float(mask_cost(method["N_F"], method["T_m"])) if name == "ssam_f" else 0.0
    if name == "sgd":
        return 1.0, 1.0, 0.0
    if name == "sam":
        return 2.0, 2.0, 0.0
    return 1.0 + (1.0 - float(method["sparsity"])) + mask, 2.0 + mask, mask


def early_lag(method: dict) -> float:
    """How far behind its final curve a method starts (it vanishes at the last epoch)."""
    if method["name"] == "sgd":
        return 0.0
    lag = 0.016 * (float(method["rho"]) / RHO_BEST) ** 0.5
    if method["name"] in SPARSE:
        lag *= 0.7 + 0.5 * float(method["sparsity"]) ** 2
    return lag


def clean_curve(method: dict, epoch: int, epochs: int) -> float:
    """Noise-free validation accuracy after ``epoch`` of ``epochs``."""
    x = epoch / epochs
    return final_accuracy(method) - 0.2 * (1.0 - x) ** 1.3 - early_lag(method) * (1.0 - x)


# -- noise --------------------------------------------------------------------------------------
def relevant(method: dict) -> dict:
    """The method keys that the model reads for this method (the trial's identity)."""
    keys = {"sgd": (), "sam": ("rho",), "ssam_f": ("rho", "sparsity", "N_F", "T_m"),
            "ssam_d": ("rho", "sparsity", "alpha")}[method["name"]]
    return {"name": method["name"], **{k: method[k] for k in keys}}


def _normal(*key) -> float:
    """A standard normal draw fixed by ``key`` (any JSON-able values)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()
    return float(np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal())


def noisy(method: dict, seed: int, epoch: int, epochs: int) -> tuple[float, float]:
    """(val_acc, test_acc) as reported after ``epoch``: deterministic in (config, seed, epoch)."""
    ident = relevant(method)
    x = epoch / epochs
    offset = 0.0010 * _normal("offset", seed, ident)
    jitter_sd = 0.0006 + 0.008 * (1.0 - x) ** 2
    clean = clean_curve(method, epoch, epochs)
    val = clean + offset * x + jitter_sd * _normal("val", seed, ident, epoch)
    test = clean - 0.003 + offset * x + jitter_sd * _normal("test", seed, ident, epoch)
    return val, test


# -- the table -----------------------------------------------------------------------------------
# The grid the synthetic table records: a product per method over the searched keys, wider
# than the real tables' (the model is free to evaluate).
GRID = {"rho": [0.02, 0.05, 0.1, 0.2, 0.5], "sparsity": [0.2, 0.5, 0.75, 0.9, 0.99], "N_F": [16, 128, 512],
        "T_m": [1, 5, 20], "alpha": [0.2, 0.5, 0.8]}


def grid_methods() -> list[dict]:
    """Every config of the synthetic grid, as a ``method`` section."""
    out = [{"name": "sgd"}] + [{"name": "sam", "rho": r} for r in GRID["rho"]]
    for r, s, n, t in itertools.product(GRID["rho"], GRID["sparsity"], GRID["N_F"], GRID["T_m"]):
        out.append({"name": "ssam_f", "rho": r, "sparsity": s, "N_F": n, "T_m": t})
    for r, s, a in itertools.product(GRID["rho"], GRID["sparsity"], GRID["alpha"]):
        out.append({"name": "ssam_d", "rho": r, "sparsity": s, "alpha": a})
    return out


def write_table(path, epochs: int = 12, seeds=(0, 1, 2)) -> None:
    """The model's curves over :func:`grid_methods` in the table format of
    ``benchmarks/curves/README.md`` (noise drawn per seed as above; wall seconds synthetic)."""
    from make_curves import COLUMNS, config_id

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for method in grid_methods():
            params = {f"method.{k}": v for k, v in method.items()}
            th, ex, mask = cost_per_epoch({**{"sparsity": 0, "N_F": 0, "T_m": 1}, **method})
            for seed in seeds:
                for e in range(1, epochs + 1):
                    val, test = noisy(method, seed, e, epochs)
                    writer.writerow({
                        "config": config_id(params), "seed": seed, "epoch": e, "epochs": epochs,
                        "status": "completed" if e == epochs else "running",
                        "name": method["name"], "granularity": "", **{k: method.get(k, "") for k in GRID},
                        "val_acc": f"{val:.6g}", "test_acc": f"{test:.6g}",
                        "flops_theoretical": f"{th * FLOPS_PER_EPOCH * e:.6g}",
                        "flops_executed": f"{ex * FLOPS_PER_EPOCH * e:.6g}",
                        "flops_mask": f"{mask * FLOPS_PER_EPOCH * e:.6g}",
                        "epoch_seconds": f"{ex * SECONDS_PER_EPOCH:.6g}",
                        "train_seconds": f"{ex * SECONDS_PER_EPOCH * e:.6g}",
                    })
