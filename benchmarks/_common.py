"""What the benchmark scripts share: output, header, device set-up and the timing loop.

The scripts are run as ``python benchmarks/bench_x.py`` from the repository root; Python
then puts this folder first on ``sys.path``, so ``import _common`` finds this file (the
folder is not a package).

How the timing scripts measure, and why:

- **Synchronise the device around every timed call.** CUDA runs kernels asynchronously: a
  clock read without ``torch.cuda.synchronize`` measures how long the work took to queue,
  not to run. On CPU there is nothing to wait for and :func:`sync` does nothing.
- **Interleave rounds.** The CPU machine is shared (2 cores, other people's test suites),
  so its speed drifts over minutes. Timing variant A for a minute and then B for a minute
  would charge that drift to whichever ran at the bad moment. :func:`interleave` instead
  runs one block of every variant per round, rotating the order each round, so every
  variant sees the same conditions, and two variants timed in the same round can be
  compared pairwise (:func:`paired_ratio`), which cancels the noise the round shares.
- **Report medians.** A block that overlaps someone else's burst of work is much slower
  (the max columns of the outputs show 2-4x outliers). The median ignores a minority of
  such blocks where a mean would not; ratios are the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- output
class Tee:
    """``print`` that also keeps every line, to write the committed ``.txt`` at the end.

    ``live``: a file to write each line to as it is printed (flushed), so that a run cut
    short (a GPU session's ``timeout``) still leaves its numbers.
    """

    def __init__(self, live: str | Path | None = None) -> None:
        self.lines: list[str] = []
        self._live = open(live, "w") if live else None  # open for the whole run

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)
        if self._live is not None:
            self._live.write(line + "\n")
            self._live.flush()

    def save(self, path: Path | None) -> None:
        """Write all lines to ``path`` (nothing when None) and say so on the console."""
        if path is not None:
            path.write_text("\n".join(self.lines) + "\n")
            print(f"(written to {path})")


def header(out: Callable[[str], object], name: str, device: str | torch.device = "cpu",
           packages: Iterable[str] = ()) -> None:
    """The first lines of every output: script, date, versions, hardware, load, command line.

    ``packages``: further distributions whose versions matter to the script (e.g. ray).
    """
    device = torch.device(device)
    versions = "".join(f", {p} {importlib.metadata.version(p)}" for p in packages)
    out(f"# {name}  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    out(f"# torch {torch.__version__}, python {platform.python_version()}{versions}, "
        f"os.cpu_count()={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
        f"1-min load average {os.getloadavg()[0]:.1f}")
    if device.type == "cuda":
        out(f"# device: cuda ({torch.cuda.get_device_name(device)}); TF32 allowed: cuDNN convolutions "
            f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        out(f"# device: cpu ({platform.processor() or platform.machine()}, "
            f"capability {torch.backends.cpu.get_cpu_capability()})")
    out(f"# command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
    import ssam_tune

    out(f"# ssam_tune: {Path(ssam_tune.__file__).parent}")


# ----------------------------------------------------------------------------- command line
def add_device_args(ap: argparse.ArgumentParser, name: str, tf32_flag: bool = False) -> None:
    """``--device``, ``--threads``, ``--out`` (and ``--no-tf32``), as :func:`setup` and
    :func:`output_path` read them."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the "
                    "2-core machine is shared, and 2 OpenMP threads next to a busy core time "
                    "erratically; 0 keeps torch's default)")
    ap.add_argument("--out", default=None, help="output file ('-' for stdout only; default "
                    f"benchmarks/{name}.txt for a full CPU run, benchmarks/{name}_cuda.txt on CUDA)")
    if tf32_flag:
        ap.add_argument("--no-tf32", action="store_true", help="CUDA: float32 convolutions and matmuls "
                        "in full float32 (PyTorch's default lets cuDNN convolutions use TF32)")


def setup(args: argparse.Namespace) -> torch.device:
    """The device asked for (an error if it is CUDA and there is none); sets the thread count
    and, with ``--no-tf32``, turns TF32 off."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if getattr(args, "no_tf32", False):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def output_path(args: argparse.Namespace, name: str) -> Path | None:
    """Where the run's output goes: ``--out`` if given ('-': nowhere), nothing for ``--quick``,
    else ``benchmarks/<name>.txt`` (CPU) or ``benchmarks/<name>_<device>.txt``."""
    if args.out == "-":
        return None
    if args.out:
        return Path(args.out)
    if getattr(args, "quick", False):
        return None
    return HERE / (f"{name}.txt" if args.device == "cpu" else f"{name}_{args.device}.txt")


# ----------------------------------------------------------------------------- timing
def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device) -> tuple[float, object]:
    """Seconds one call of ``fn`` takes, the device synchronised before and after; and its result."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def interleave(fns: dict[str, Callable[[], object]], rounds: int, device: str | torch.device = "cpu", *,
               rotate: bool = True, each: Callable[[int, str, float, object], object] | None = None,
               deadline: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of every ``fns[name]``: one call of each per round, ``rounds`` rounds.

    ``rotate``: round r starts at the r-th name (A B C, B C A, C A B, ...), so that no variant
    always runs right after the same other one (its allocations, its caches) or always last.
    ``each(r, name, seconds, result)`` is called after every call (to keep a result, print).
    ``deadline``: a ``time.perf_counter()`` value past which no further round starts (the
    first always runs). Warm-up is the caller's: these calls are all timed.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        if r > 0 and deadline is not None and time.perf_counter() > deadline:
            break
        k = r % len(names) if rotate else 0
        for name in names[k:] + names[:k]:
            seconds, result = timed(fns[name], device)
            times[name].append(seconds)
            if each is not None:
                each(r, name, seconds, result)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of times[a] / times[b] (paired: noise shared by a round cancels)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


# ----------------------------------------------------------------------------- quiet Ray
@contextlib.contextmanager
def quiet_stdout() -> Iterator[TextIO]:
    """Send fd 1 (Ray Tune's tables, worker logs, the searcher's console lines) to stderr while
    the block runs; yields a file on the real stdout for the report's own lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        real.flush()
        os.dup2(saved, 1)
        os.close(saved)
        real.close()
