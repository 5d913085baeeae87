"""The text of ``summary.md``: settings, counts, the best trial, the front, failures and
provenance; and the helpers that keep the confirmation block (written by
:func:`ssam_tune.export.confirm.export_confirmation`) at its end across re-exports.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from ssam_tune.export.front import hp_values
from ssam_tune.export.read import STATUSES
from ssam_tune.export.write import cost_words, fmt_pct, fmt_sci, md_table
from ssam_tune.storage.experiment import STATE_PREFIX

CONFIRM_BEGIN = "<!-- ssam_tune:confirmation:begin -->"
CONFIRM_END = "<!-- ssam_tune:confirmation:end -->"
NOTE_SELECTION = ("Selection (the front, the best trial) used validation accuracy at the final epoch; "
                  "test accuracy is only reported, never used to choose.")


def _fmt_hp(row: dict, keys: list[str]) -> str:
    parts = []
    for k, v in hp_values(row, keys).items():
        if v is None:
            continue
        short = k.split(".", 1)[-1]
        parts.append(f"{short}={v:.4g}" if isinstance(v, float) else f"{short}={v}")
    return ", ".join(parts)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("ssam-tune", "torch", "ray", "optuna"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["python"] = platform.python_version()
    return out


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def _hardware() -> str:
    gpu = "none"
    torch = sys.modules.get("torch")
    try:
        if torch is not None:  # the search's own process: torch is loaded already
            if torch.cuda.is_available():
                gpu = torch.cuda.get_device_name(0)
        else:  # an export alone never imports torch (~450 MiB): ask the NVIDIA driver's tool
            res = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False)
            if res.returncode == 0 and res.stdout.strip():
                gpu = res.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass  # no nvidia-smi: no NVIDIA GPU
    except Exception:  # noqa: BLE001 - a broken CUDA set-up must not stop the export
        gpu = "unknown"
    return f"{platform.platform()}, {os.cpu_count()} CPUs, GPU: {gpu}"


def _experiment_started(exp: Path) -> str | None:
    names = sorted(p.name for p in exp.glob(f"{STATE_PREFIX}*.json"))
    if not names:
        return None
    return names[0].removeprefix(STATE_PREFIX).removesuffix(".json")


def _settings_lines(space) -> list[str]:
    t = space.tune
    what, _ = cost_words(t.flops)
    lines = [f"- mode: {space.mode}"]
    if space.mode == "search":
        lines.append("- searched keys: " + "; ".join(f"`{d.key}` {d.describe()}" for d in space.search))
        fixed = len(space.tune.baselines)
        lines.append(f"- budget: {fixed + t.num_samples} trials ({fixed} baselines: "
                     f"{', '.join(t.baselines) or 'none'}; {t.num_samples} sampled), "
                     f"{space.epochs} epochs each at most")
    else:
        lines.append(f"- budget: {len(space.cases)} cases x {len(space.seeds)} seeds, {space.epochs} epochs each")
    if t.objective == "single":
        lines.append("- objective: single (validation accuracy, max). The front below is still computed on "
                     f"(val_acc, `{t.flops_metric}`) for reference.")
    else:
        lines.append(f"- objective: multi (validation accuracy: max; `{t.flops_metric}`: min)")
    lines.append(f"- cost: {t.flops} ({what}; column `{t.flops_metric}`)")
    lines.append(f"- sampler: {t.describe_sampler(space.epochs)}")
    lines.append(f"- scheduler: {t.describe_scheduler(space.epochs)}")
    lines.append(f"- resources per trial: {t.cpu:g} CPU, {t.gpu:g} GPU; max concurrent trials: "
                 f"{t.max_concurrent_trials or 'auto'}; time budget: "
                 f"{f'{t.time_budget_s:g} s' if t.time_budget_s else 'none'}; max failures: {t.max_failures}")
    if t.confirm_top_k:
        lines.append(f"- confirmation: top {t.confirm_top_k} front points x seeds {t.confirm_seeds}")
    return lines


def summary_text(space, exp: Path, rows: list[dict], front: list[dict], best: dict | None, keys: list[str],
                  sgd_cost: float | None, loose: list[dict], optuna_problem: str | None, configs: dict,
                  shown: str) -> str:
    t = space.tune
    cost = t.flops_metric
    lines = [f"# Experiment `{space.name}`", ""]
    dates = sorted(d for r in rows for d in (r.get("date_first"), r.get("date_last")) if d)
    started = _experiment_started(exp)
    lines.append(f"Experiment folder `{shown}`" + (f", started {started}" if started else "") +
                 (f"; results from {dates[0]} to {dates[-1]}." if dates else "; no results yet."))
    lines += ["", f"**{NOTE_SELECTION}**", "", "## Search settings", ""]
    lines += _settings_lines(space)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines += ["", "## Trials", ""]
    lines += md_table(["status", "trials"], [[s, counts[s]] for s in STATUSES] + [["total", len(rows)]])
    lines += ["", ("completed: ran every epoch (full fidelity); pruned: stopped early by the scheduler or the "
                   "time budget; diverged: NaN/inf loss; errored: Ray recorded an error; pending: never reported.")]
    if sgd_cost:
        lines += ["", (f"Relative costs (`flops_rel`) are multiples of the SGD anchor's final `{cost}` "
                       f"({sgd_cost:.4g}).")]
    else:
        lines += ["", "No SGD anchor completed: costs are absolute."]
    lines += ["", "## Best trial", ""]
    if best is None:
        lines.append("No trial completed.")
    else:
        rel = f" ({best['flops_rel']:.2f}x SGD)" if best.get("flops_rel") else ""
        lines.append(f"Trial `{best['trial_id']}` ({best['label']}, method {best.get('method.name')}; "
                     f"{_fmt_hp(best, keys) or 'no tuned keys'}): val_acc {fmt_pct(best['val_acc'])}, "
                     f"test_acc {fmt_pct(best.get('test_acc'))}, `{cost}` {fmt_sci(best.get(cost))}{rel}. "
                     "Config: `best_config.yaml`.")
    lines += ["", f"## Pareto front (val_acc: max, `{cost}`: min; completed trials only)", ""]
    if front:
        sharp = any("lambda_max" in r for r in front)  # tune.diagnostics: sharpness
        body = [[k, r["trial_id"], r["label"], r.get("method.name"), _fmt_hp(r, keys), fmt_pct(r["val_acc"]),
                 fmt_pct(r.get("test_acc")), fmt_sci(r.get(cost)),
                 f"{r['flops_rel']:.3f}" if r.get("flops_rel") else "",
                 *([_fmt_g(r.get("lambda_max")), _fmt_g(r.get("hessian_trace"))] if sharp else []),
                 f"`{configs.get(r['trial_id'], '')}`"] for k, r in enumerate(front)]
        lines += md_table(["k", "trial", "label", "method", "hyper-parameters", "val_acc", "test_acc", cost,
                           "x SGD", *(["lambda_max", "Hessian trace"] if sharp else []), "config"], body)
        if sharp:
            lines += ["", ("lambda_max: the top eigenvalue of the Hessian of the training loss at the trial's final "
                           "weights; Hessian trace: Hutchinson's estimate (1,000 seeded training samples, BatchNorm "
                           "in eval mode; `diagnostics.json` in the experiment folder has every figure). Blank: "
                           "not measured (see that file).")]
    else:
        lines.append("Empty: no trial completed.")
    if sgd_dominates(front):
        lines += ["", f"**{SGD_DOMINATES}**"]
    lines += ["", "![front](pareto.png)", ""]
    for status, note in (("pruned", "stopped early; their accuracies are not full fidelity"),
                         ("diverged", "loss became NaN or infinite"), ("errored", "Ray recorded an error")):
        group = [r for r in rows if r["status"] == status]
        lines += [f"## {status.capitalize()} trials ({len(group)})", ""]
        if not group:
            lines += ["None.", ""]
            continue
        lines.append(f"({note})")
        lines.append("")
        for r in group:
            extra = f"; error: `{r['error']}`" if r.get("error") else ""
            acc = f", last val_acc {fmt_pct(r.get('val_acc'))}" if r.get("val_acc") is not None else ""
            lines.append(f"- `{r['trial_id']}` {r['label']} ({r.get('method.name')}; {_fmt_hp(r, keys)}): "
                         f"{r['epochs_reached']}/{r['epochs']} epochs{acc}{extra}")
        lines.append("")
    recovered = [r for r in rows if r.get("failures") and r["status"] in ("completed", "pruned")]
    if recovered:
        lines += ["Trials that failed and were retried: " + ", ".join(
            f"`{r['trial_id']}` ({r['failures']}x, last: `{r['error']}`)" for r in recovered), ""]
    pending = [r for r in rows if r["status"] == "pending"]
    if pending:
        names = ", ".join(f"`{r['trial_id']}` {r['label']}" for r in pending)
        lines += [f"Pending (never reported): {names}", ""]
    known = {r["trial_id"] for r in rows}
    orphans = [t_ for t_ in loose if t_["ray_trial_id"] not in known]
    if orphans:
        lines += ["Optuna trials without a Ray trial folder: " + ", ".join(
            f"#{t_['number']} ({t_['status']})" for t_ in orphans), ""]
    if optuna_problem and any(r["optuna_number"] is not None for r in rows):
        lines += [f"Note: {optuna_problem}.", ""]
    v = _versions()
    hosts = sorted({str(r["hostname"]) for r in rows if r.get("hostname")})
    lines += ["## Provenance", "",
              f"- ssam_tune git commit: {_git_commit() or 'unknown (not a git checkout)'}",
              "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
              f"- search seed: {t.seed}",
              f"- trained on host(s): {', '.join(hosts) or 'unknown'}",
              f"- exported on: {_hardware()}", ""]
    return "\n".join(lines)


def _fmt_g(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""


def sgd_dominates(front: list[dict]) -> bool:
    """The front is the SGD anchor alone: no costlier trial beat its validation accuracy."""
    return len(front) == 1 and front[0]["kind"] == "baseline" and front[0]["label"] == "sgd"


SGD_DOMINATES = ("At this scale SGD dominates: no costlier trial beat its validation accuracy, so the front is "
                 "one point. SAM-family methods earn their cost with long schedules on full data sets (the "
                 "paper: 200 epochs on CIFAR, +0.5 to +1.5 points over SGD, Tables 1-3); on a GPU, search a "
                 "space such as search_spaces/resnet18_cifar10.yaml.")


def separating_digits(values: list[float], least: int = 2, most: int = 4) -> int:
    """The fewest decimals (``least`` to ``most``) at which distinct costs print distinctly, so
    that two front points of 1.447x and 1.454x do not both read 1.45x (one would look
    dominated by the other)."""
    distinct = sorted(set(values))
    for digits in range(least, most + 1):
        shown = [f"{v:.{digits}f}" for v in distinct]
        if len(set(shown)) == len(shown):
            return digits
    return most


def console_text(space, rows: list[dict], front: list[dict], best: dict | None, keys: list[str], out: Path,
                 journal: str | None) -> str:
    """What the search prints when it ends: counts, the best trial, the front, what to run next."""
    cost = space.tune.flops_metric
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = ["", f"== {space.name}: {len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    if best is None:
        lines.append("no trial completed: nothing to select")
    else:
        rel = f", {best['flops_rel']:.2f}x SGD" if best.get("flops_rel") else ""
        hp = _fmt_hp(best, keys)
        lines.append(f"best (val_acc): {best['label']} [{best.get('method.name')}{'; ' + hp if hp else ''}] val_acc "
                     f"{fmt_pct(best['val_acc'])}, test_acc {fmt_pct(best.get('test_acc'))}{rel}")
    if front:
        lines.append(f"Pareto front (completed trials; val_acc max, {cost} min), cheapest first:")
        digits = separating_digits([r["flops_rel"] for r in front if r.get("flops_rel")])
        for r in front:
            rel = f"{r['flops_rel']:{digits + 3}.{digits}f}x SGD" if r.get("flops_rel") else fmt_sci(r.get(cost))
            hp = _fmt_hp(r, keys)
            lines.append(f"  {rel}  val_acc {fmt_pct(r['val_acc'])}  test_acc {fmt_pct(r.get('test_acc'))}  "
                         f"{r['label']} [{r.get('method.name')}{'; ' + hp if hp else ''}]")
        if sgd_dominates(front):
            lines.append("note: " + SGD_DOMINATES)
    lines.append(f"exports: {out}/ (summary.md, pareto.png, trials.csv, best_config.yaml)")
    if best is not None:
        lines.append(f"  train the best config:  python -m ssam_tune.train {out / 'best_config.yaml'} "
                     f"--out runs/{space.name}-best")
    lines.append(f"  TensorBoard:            tensorboard --logdir {out / 'tensorboard'}")
    if journal:
        lines.append(f"  Optuna dashboard:       pip install optuna-dashboard && optuna-dashboard {journal}")
    return "\n".join(lines)


def confirmation_block(text: str) -> str | None:
    start, end = text.find(CONFIRM_BEGIN), text.find(CONFIRM_END)
    if start < 0 or end < start:
        return None
    return text[start:end + len(CONFIRM_END)]


def with_confirmation(summary: str, block: str | None) -> str:
    """``summary`` with the confirmation block put at its end (replacing an older one)."""
    old = confirmation_block(summary)
    if old is not None:
        summary = summary.replace(old, "").rstrip("\n") + "\n"
    if block:
        summary = summary.rstrip("\n") + "\n\n" + block + "\n"
    return summary
