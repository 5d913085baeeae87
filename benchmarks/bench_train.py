"""Training throughput of SGD, SAM, SSAM-F (tensor, 50%) and SAM-ON through the real training
loop, eager and with ``train.compile: true``, with the model FLOPs utilisation (MFU).

Runs ssam_tune.training.trainer.Trainer's epoch loop (``Trainer._train_epoch``: in-memory data on the
device, vectorised augmentation, mask refreshes, the SSAM pass at w inside
``opt.first_pass()``) on the embedded CIFAR-10 subset, ResNet-18 (CIFAR variant), one trainer
per method and mode, all from the same initial weights. On CUDA: full width, batch 128, bf16
autocast and channels_last (the Trainer's GPU defaults, precision auto); on CPU: float32, a
narrow width (a smoke run; torch threads 1 by default).

Methods: ``sgd``; ``sam``; ``ssam_f`` with ``granularity: tensor, sparsity: 0.5`` (whole
tensors, chosen by Fisher score per backward FLOP; N_F = 128 and one Fisher refresh per
epoch, T_m = 1, as the Trainer's defaults say, its time included in the epoch); ``sam_on``
(normalization layers only). Each in eager mode, and, on CUDA (on CPU only with
``--compile``), with ``train.compile: true`` (the Trainer's ``torch.compile(model)``, default
mode; nothing else of the step is compiled).

What is measured, in this order (every line written as it comes, so a run cut short still
leaves its numbers):

1. The device's dense matmul rate: ``torch.matmul`` of two n x n matrices (CUDA: bf16,
   n = 8192; CPU: float32, n = 1024), after warm-up, the device synchronised around a block
   of calls; best of 3 blocks, 2 n^3 FLOPs per call. The MFU denominator.
2. Eager: every trainer's first epoch untimed (allocator, cuDNN, the first mask), then
   ``--eager-rounds`` rounds of one timed epoch per method; with compiles to come, the
   summary (below) of these eager rounds, so a run killed in the compiles keeps it.
3. Compiled: per method, a compiled trainer's first epoch (the compile; printed with its
   number of new graphs) and second epoch (steady, printed next to it), excluded from the
   timing; compile ~ first - second. Then one round of every variant so far. Dynamo shares
   graphs between trainers of one process (its guards are on the module's type and the
   tensors' properties, not on the module instance), so a later trainer compiles only the
   graphs not seen yet: SAM reuses SGD's graph; SSAM-F tensor and SAM-ON add one each, their
   pass at w with other tensors requiring gradients. No compile starts after ``--budget-s``.
4. Rounds of one timed epoch of every variant (eager and compiled interleaved, the order
   rotating; benchmarks/_common.py says why) until ``--rounds`` or ``--budget-s``. A timed
   epoch that compiled a new graph (a mask whose set of tensors changed) is printed and left
   out of the medians.
5. Summary per variant: median img/s (train images of the epoch / its seconds), ms per step,
   FLOPs per image, achieved TFLOP/s, MFU, the median time of the epoch's mask refreshes and
   img/s without it; then the goals: SAM step / SGD step <= 2.05 (median over rounds of the
   per-round ratio of SGD's img/s to SAM's) and SGD >= 30,000 img/s, each "met" or "NOT
   met", per mode; and compiled / eager img/s per method. Also printed when SIGTERM (a
   ``timeout``) stops the run, from what was timed so far.

FLOPs per image: the Trainer's own accounting of the executed step, the increase of
``trainer.tracker["flops_executed"]`` over the timed epoch (what the ``flops_steps_executed``
metric sums) divided by the epoch's ``train_images``: F + B for SGD, 2F + B1 + B for the
others, B1 the backward of the pass at w measured with that pass's requires-grad set
(ssam_tune.method.flops, FlopCounterMode on a meta-device copy: convolutions and matmuls, 2 FLOPs per
multiply-add). The Fisher refresh of SSAM-F (``flops_mask``) is not counted, though its time
is in the epoch: its MFU is a little low for that. MFU = FLOPs per image x img/s / measured
matmul rate (not the data-sheet peak).

    python benchmarks/bench_train.py --width 0.0625 --steps 2 --rounds 1 --out -   # CPU smoke
    python benchmarks/bench_train.py --device cuda --out OUT.txt   # GPU: about 3-4 minutes

No assertion on the numbers.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import Tee, header, interleave, sync  # noqa: E402

from ssam_tune.training.config import config_from_dict  # noqa: E402
from ssam_tune.training.data import load_dataset  # noqa: E402
from ssam_tune.training.trainer import Trainer  # noqa: E402

NAME = Path(__file__).stem
# key: (label, method section)
METHODS = {
    "sgd": ("SGD", {"name": "sgd"}),
    "sam": ("SAM", {"name": "sam"}),
    "ssam_t50": ("SSAM-F tensor 50%", {"name": "ssam_f", "granularity": "tensor", "sparsity": 0.5}),
    "sam_on": ("SAM-ON", {"name": "sam_on"}),
    "ssam_f50": ("SSAM-F 50% (element)", {"name": "ssam_f", "sparsity": 0.5}),  # not by default
    # perturbation schedules (method/schedule.py), not by default: use --steps a multiple of 4
    "sam_k2": ("SAM, every 2nd step", {"name": "sam", "perturb_every": 2}),
    "sam_k4": ("SAM, every 4th step", {"name": "sam", "perturb_every": 4}),
    "ssam_f50_k4": ("SSAM-F 50%, every 4th step", {"name": "ssam_f", "sparsity": 0.5, "perturb_every": 4}),
}
GOAL_K4_OVER_SAM = 0.70  # seconds of SAM every 4th step / every-step SAM, at most (issue 23)
DEFAULT_METHODS = ("sgd", "sam", "ssam_t50", "sam_on")
GOAL_SAM_OVER_SGD = 2.05  # SAM step time / SGD step time, at most
GOAL_SGD_IMG_S = 30_000.0  # SGD images per second, at least


class Stopped(Exception):
    """SIGTERM arrived (``timeout``): stop timing and print the summary so far."""


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (0 if the counter is unavailable)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - an older/newer torch without the counter
        return 0
    return int(counters["stats"]["unique_graphs"])


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, calls: int) -> float:
    """FLOP/s of torch.matmul of two n x n ``dtype`` matrices: best of 3 timed blocks of
    ``calls`` calls, after a warm-up block; 2 n^3 FLOPs per call."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for block in range(4):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=out)
        sync(device)
        if block > 0:  # block 0 is the warm-up (cuBLAS handle, kernel choice)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * calls / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU machine is "
                   "shared; 0 keeps torch's default)")
    p.add_argument("--width", type=float, default=None, help="default 1.0 on GPU, 0.25 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 on GPU, 64 on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 35 on GPU, the "
                   "whole 4,500-image training split at batch 128; 8 on CPU)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time train.compile: true (default: on CUDA yes, on CPU no: slow there)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds in all (default 40 on GPU, 3 on CPU; "
                   "--budget-s usually ends the GPU run first)")
    p.add_argument("--eager-rounds", type=int, default=3, help="eager-only rounds before compiling (so a run "
                   "cut short in the compiles still has eager numbers)")
    p.add_argument("--budget-s", type=float, default=None, help="no round or compile starts after this many "
                   "seconds from the start (default 200 on GPU, 600 on CPU)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the rate (default 8192 bf16 on "
                   "GPU, 1024 float32 on CPU; 0: skip the rate and MFU)")
    p.add_argument("--out", default=None, help="also write the lines to this file as they come ('-' or "
                   "nothing: stdout only)")
    args = p.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    width = args.width or (1.0 if gpu else 0.25)
    bs = args.batch_size or (128 if gpu else 64)
    steps = args.steps or (35 if gpu else 8)
    rounds = args.rounds or (40 if gpu else 3)
    budget = args.budget_s or (200.0 if gpu else 600.0)
    do_compile = gpu if args.compile is None else args.compile
    peak_n = (8192 if gpu else 1024) if args.peak_n is None else args.peak_n
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        raise SystemExit(f"--methods: unknown {unknown}; choices: {', '.join(METHODS)}")
    say = Tee(live=None if args.out in (None, "-") else args.out)
    start = time.perf_counter()
    deadline = start + budget

    def clock() -> str:
        return f"[{time.perf_counter() - start:5.0f} s]"

    header(say, NAME, device)
    precision = "bf16 autocast + channels_last" if gpu else "float32"
    say(f"# resnet18 width {width}, batch {bs}, {steps} steps per timed epoch, embedded CIFAR-10 subset in "
        f"memory, {precision}; methods {', '.join(keys)}; compile {'yes' if do_compile else 'no'}; "
        f"budget {budget:.0f} s, at most {rounds} rounds")

    # 1. The matmul rate (MFU denominator).
    peak = None
    if peak_n > 0:
        dtype = torch.bfloat16 if gpu else torch.float32
        peak = matmul_rate(device, peak_n, dtype, calls=50 if gpu else 3)
        say(f"{clock()} matmul {peak_n}x{peak_n} {str(dtype).removeprefix('torch.')}: {peak / 1e12:.4g} TFLOP/s "
            f"measured (best of 3 blocks)")

    data = load_dataset("embedded", val_fraction=0.1, seed=0)

    def build(key: str, compiled: bool) -> Trainer:
        cfg = config_from_dict({"model": {"width": width}, "train": {
            "epochs": 1000, "batch_size": bs, "max_steps_per_epoch": steps, "device": args.device,
            "compile": compiled}, "method": METHODS[key][1]})
        return time_refreshes(Trainer(cfg, data=data))

    refresh_s: dict[int, float] = {}  # id(trainer) -> seconds spent in mask refreshes so far

    def time_refreshes(tr: Trainer) -> Trainer:
        """Time the trainer's mask refreshes (Fisher pass, mask build), synchronised: shadows
        the bound method on this instance only (two syncs per refresh, once an epoch)."""
        refresh = tr._refresh_mask
        refresh_s[id(tr)] = 0.0

        def timed_refresh(before_grad: bool) -> None:
            sync(device)
            t0 = time.perf_counter()
            refresh(before_grad=before_grad)
            sync(device)
            refresh_s[id(tr)] += time.perf_counter() - t0

        tr._refresh_mask = timed_refresh  # type: ignore[method-assign]
        return tr

    def epoch(tr: Trainer) -> dict:
        """One training epoch, with what it executed: step FLOPs, mask FLOPs, new graphs and
        the seconds of its mask refreshes."""
        flops0, mask0, graphs0 = tr.tracker["flops_executed"], tr.tracker["flops_mask"], graphs_compiled()
        refresh0 = refresh_s[id(tr)]
        m = tr._train_epoch()
        if m is None:
            raise SystemExit("the loss became NaN or infinite")
        return {"images": m["train_images"], "flops": tr.tracker["flops_executed"] - flops0,
                "mask_flops": tr.tracker["flops_mask"] - mask0, "new_graphs": graphs_compiled() - graphs0,
                "refresh_s": refresh_s[id(tr)] - refresh0}

    def timed_epoch(tr: Trainer) -> tuple[float, dict]:
        sync(device)
        t0 = time.perf_counter()
        m = epoch(tr)
        sync(device)
        return time.perf_counter() - t0, m

    trainers: dict[str, Trainer] = {}  # variant ("sgd eager", "sgd compiled") -> trainer
    rates: dict[str, dict[int, float]] = {}  # variant -> {round: img/s}
    refresh_ms: dict[str, list[float]] = {}  # variant -> ms of mask refresh per timed epoch
    rates_ex: dict[str, list[float]] = {}  # variant -> img/s with the refresh time taken out
    per_image: dict[str, float] = {}  # variant -> step FLOPs per image (last timed epoch)
    mask_flops: dict[str, float] = {}  # variant -> Fisher/mask FLOPs per epoch
    round_no = 0

    def record(r: int, variant: str, seconds: float, m: dict) -> None:
        rate = m["images"] / seconds
        per_image[variant] = m["flops"] / m["images"]
        mask_flops[variant] = m["mask_flops"]
        if m["new_graphs"]:
            say(f"{clock()} round {round_no + r}: {variant:26s} {rate:10.1f} img/s  ({m['new_graphs']} new "
                f"graphs compiled in this epoch: left out)")
            return
        rates[variant][round_no + r] = rate
        refresh_ms.setdefault(variant, []).append(1000 * m["refresh_s"])
        rates_ex.setdefault(variant, []).append(m["images"] / (seconds - m["refresh_s"]))
        extra = f"  (mask refresh {1000 * m['refresh_s']:.0f} ms)" if m["refresh_s"] else ""
        say(f"{clock()} round {round_no + r}: {variant:26s} {rate:10.1f} img/s{extra}")

    def run_rounds(n: int) -> int:
        fns = {v: (lambda tr=tr: epoch(tr)) for v, tr in trainers.items()}
        times = interleave(fns, n, device, rotate=True, each=record, deadline=deadline)
        return min(len(t) for t in times.values())

    def summary(title: str) -> None:
        """The table and the goals from the timed epochs so far."""
        say()
        say(f"## {title}")
        say(f"{'variant':26s} {'img/s':>10s} {'min':>9s} {'max':>9s} {'n':>3s} {'ms/step':>8s} {'GFLOP/img':>10s} "
            f"{'TFLOP/s':>8s} {'MFU':>7s} {'refresh ms':>10s} {'img/s excl':>10s}")
        med: dict[str, float] = {}
        for variant, by_round in rates.items():
            if not by_round:
                say(f"{variant:26s} {'-':>10s}  (no timed epoch)")
                continue
            v = list(by_round.values())
            med[variant] = statistics.median(v)
            achieved = per_image[variant] * med[variant]
            mfu = f"{100 * achieved / peak:6.1f}%" if peak else f"{'-':>7s}"
            say(f"{variant:26s} {med[variant]:10.1f} {min(v):9.1f} {max(v):9.1f} {len(v):3d} "
                f"{1000 * bs / med[variant]:8.2f} {per_image[variant] / 1e9:10.3f} {achieved / 1e12:8.3g} {mfu} "
                f"{statistics.median(refresh_ms[variant]):10.0f} {statistics.median(rates_ex[variant]):10.1f}")
        if peak:
            say(f"# MFU: step FLOPs per image (the Trainer's flops_executed over the epoch's train_images) x img/s / "
                f"{peak / 1e12:.4g} TFLOP/s measured {'bf16' if gpu else 'float32'} matmul rate")
        say("# ms/step = batch / median img/s; refresh ms: median time of the epoch's mask refreshes (SSAM-F: one "
            "Fisher pass of N_F=128 samples and the mask, each epoch; SAM-ON: its fixed mask, first epoch only); "
            "img/s excl: median img/s with that time taken out")
        for variant, f in mask_flops.items():
            if f:
                say(f"# {variant}: mask refresh {f / 1e9:.1f} GFLOP per epoch (Fisher), in its time, not in its FLOPs")
        for variant, s in compile_s.items():
            say(f"# compile {variant}: ~{s:.1f} s (first compiled epoch - second; excluded from the timing)")

        say()
        for mode in ("eager", "compiled"):
            sgd, sam = rates.get(f"sgd {mode}", {}), rates.get(f"sam {mode}", {})
            both = sorted(set(sgd) & set(sam))
            if both:
                ratio = statistics.median(sgd[r] / sam[r] for r in both)
                ok = "met" if ratio <= GOAL_SAM_OVER_SGD else "NOT met"
                say(f"SAM step / SGD step, {mode:8s}: {ratio:6.3f}  (median of {len(both)} rounds; goal <= "
                    f"{GOAL_SAM_OVER_SGD}: {ok})")
            if f"sgd {mode}" in med:
                ok = "met" if med[f"sgd {mode}"] >= GOAL_SGD_IMG_S else "NOT met"
                goal = f"goal >= {GOAL_SGD_IMG_S:.0f} on one H100/H200: {ok}" if device.type == "cuda" else \
                    "the img/s goal is a GPU's"
                say(f"SGD img/s, {mode:8s}: {med[f'sgd {mode}']:10.1f}  ({goal})")
        for key in keys:  # schedules against their every-step method, side by side per round
            every = METHODS[key][1].get("perturb_every", 1)
            base = next((k for k, (_, m) in METHODS.items() if m == {n: v for n, v in METHODS[key][1].items()
                                                                     if n != "perturb_every"}), None)
            for mode in ("eager", "compiled"):
                a, b = rates.get(f"{key} {mode}", {}), rates.get(f"{base} {mode}", {})
                both = sorted(set(a) & set(b))
                if every == 1 or not both:
                    continue
                ratio = statistics.median(b[r] / a[r] for r in both)  # seconds per epoch: theirs over the base's
                flops = per_image[f"{key} {mode}"] / per_image[f"{base} {mode}"]
                goal = ""
                if key == "sam_k4":
                    goal = f"; goal <= {GOAL_K4_OVER_SAM}: {'met' if ratio <= GOAL_K4_OVER_SAM else 'NOT met'}"
                say(f"{key} / {base} seconds per epoch, {mode:8s}: {ratio:6.3f}  (median of {len(both)} rounds; "
                    f"executed FLOPs {flops:.4f}x, {(1 + 1 / every) / 2:.4f}x expected{goal})")
        for key in keys:
            e, c = rates.get(f"{key} eager", {}), rates.get(f"{key} compiled", {})
            both = sorted(set(e) & set(c))
            if both:
                say(f"compiled / eager img/s, {key:8s}: {statistics.median(c[r] / e[r] for r in both):6.3f}  "
                    f"(median of {len(both)} rounds)")

    compile_s: dict[str, float] = {}  # compiled variant -> first compiled epoch - second

    def phases() -> bool:
        """Eager warm-up and rounds, compiles, interleaved rounds; True if the budget ended them."""
        nonlocal round_no
        # 2. Eager.
        for key in keys:
            variant = f"{key} eager"
            trainers[variant] = build(key, compiled=False)
            rates[variant] = {}
            seconds, m = timed_epoch(trainers[variant])
            say(f"{clock()} warm-up {variant}: first epoch {seconds:.2f} s; step FLOPs "
                f"{m['flops'] / m['images'] / 1e9:.3f} GFLOP/image")
        f_b = trainers[f"{keys[0]} eager"].flops
        say(f"# per image: F = {f_b.F / 1e9:.3f} GFLOP, B = {f_b.B / 1e9:.3f} GFLOP (trainer.flops)")
        eager_rounds = min(args.eager_rounds, rounds) if do_compile else rounds
        round_no += run_rounds(eager_rounds)
        if not do_compile:
            return round_no < rounds
        summary("eager only, before compiling (kept in case the compiles run past the timeout)")
        say()

        # 3. Compiles, each followed by one round of every variant so far, so a run cut short
        # has numbers for the compiled ones too (a failure drops that variant, the run goes on).
        for key in keys:
            variant = f"{key} compiled"
            if time.perf_counter() > deadline:
                say(f"{clock()} compile {variant}: skipped (budget spent)")
                continue
            try:
                trainers[variant] = build(key, compiled=True)
                first, m1 = timed_epoch(trainers[variant])
                second, m2 = timed_epoch(trainers[variant])
            except Exception as exc:  # noqa: BLE001 - report, and time the others
                trainers.pop(variant, None)
                say(f"{clock()} compile {variant}: FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            rates[variant] = {}
            compile_s[variant] = first - second
            say(f"{clock()} compile {variant}: first epoch {first:.1f} s ({m1['new_graphs']} new graphs), "
                f"second {second:.2f} s ({m2['new_graphs']} new graphs): compile ~ {first - second:.1f} s")
            if round_no < rounds:
                round_no += run_rounds(1)

        # 4. Interleaved rounds, eager and compiled, until --rounds or the budget.
        if round_no < rounds and time.perf_counter() <= deadline:
            round_no += run_rounds(rounds - round_no)
        return round_no < rounds

    def on_term(signum, frame) -> None:  # noqa: ARG001 - the signal handler's signature
        raise Stopped

    signal.signal(signal.SIGTERM, on_term)  # `timeout`: stop, and still print the summary
    try:
        cut = phases()
        if cut:
            say(f"{clock()} # time budget reached after {round_no} rounds")
    except Stopped:
        say(f"{clock()} # stopped by SIGTERM (timeout): the summary of what was timed so far")
        cut = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    summary("summary" + (" (run cut short)" if cut else ""))
    say(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
