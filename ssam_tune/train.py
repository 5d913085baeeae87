"""The command line of one training run:

    python -m ssam_tune.train CONFIG.yaml [--set KEY=VALUE ...] [--out DIR] [--resume | --overwrite]
                                          [--stop-after N]

It writes ``config.yaml``, ``checkpoint.pt`` (every epoch, atomically), ``metrics.jsonl``,
``metrics.json`` and TensorBoard scalars under ``--out`` (default ``runs/<config name>``).
A bad config is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ssam_tune.storage.experiment import CKPT_FILE
from ssam_tune.storage.files import atomic_write
from ssam_tune.training.config import ConfigError, config_from_dict, config_to_dict, load_config
from ssam_tune.training.data import DataError
from ssam_tune.training.trainer import Trainer, load_checkpoint, resolve_normalize, save_checkpoint

__all__ = ["main", "run_cli"]


def _write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=float) + "\n")


# -- CLI ----------------------------------------------------------------------------------------------
def _normalised(stored) -> dict | None:
    """A config as a dict with defaults filled in and ``method.normalize`` resolved, so that
    a checkpoint written before ``auto`` existed (``full`` spelled out) matches."""
    try:
        cfg = config_from_dict(stored)
    except ConfigError:
        return None
    cfg.method.normalize = resolve_normalize(cfg.method)
    return config_to_dict(cfg)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssam_tune.train", description="Train one configuration.")
    p.add_argument("config", help="training config YAML (every key optional; see README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method.rho=0.05 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    p.add_argument("--overwrite", action="store_true", help="start again in an OUT that holds a run (its files "
                   "are replaced)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (continue later with --resume)")
    return p


def run_cli(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out or Path("runs") / Path(args.config).stem)
        ckpt_path = out / CKPT_FILE
        state = None
        held = [f for f in ("checkpoint.pt", "metrics.jsonl", "metrics.json") if (out / f).exists()]
        if held and not (args.resume or args.overwrite):
            raise ConfigError("--out", f"{out} holds a run already ({', '.join(held)}); use --resume to continue "
                              "it, --overwrite to start again, or another --out")
        if args.resume and args.overwrite:
            raise ConfigError("--overwrite", "contradicts --resume: choose one")
        if args.resume and ckpt_path.exists():
            state = load_checkpoint(ckpt_path)
            # normalised through the schema: a key added since the checkpoint takes its default
            if _normalised(state.get("config")) != _normalised(config_to_dict(cfg)):
                raise ConfigError("--resume", f"{ckpt_path} was written for a different config; "
                                  "use the same config and --set values, or another --out")
        trainer = Trainer(cfg, log=print)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:  # a fresh run: the old one's metrics and TensorBoard events would mix in
        import shutil

        for f in ("checkpoint.pt", "metrics.jsonl", "metrics.json"):
            (out / f).unlink(missing_ok=True)
        shutil.rmtree(out / "tb", ignore_errors=True)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"resumed from {ckpt_path} at epoch {trainer.epoch}")
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=trainer.epoch + 1 if state is not None else None)
    print(f"training {cfg.model.name} with {cfg.method.name} on {cfg.data.name} ({trainer.device}); "
          f"output in {out}")
    final = None
    done_here = 0
    try:
        for metrics in trainer.epochs():
            final = metrics
            done_here += 1
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None \
                        and key != "epoch" and math.isfinite(value):
                    writer.add_scalar(key, value, metrics["epoch"])
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            if metrics["status"] != "diverged":
                save_checkpoint(ckpt_path, trainer.state_dict())
            if args.stop_after is not None and done_here >= args.stop_after:
                break
    finally:
        writer.close()
    if final is None:
        final = trainer.tracker.get("last_good") or {}
    _write_json(out / "metrics.json", {"config": config_to_dict(cfg), "final": final,
                                       "status": trainer.tracker["status"], "epochs_done": trainer.epoch})
    print(f"{trainer.tracker['status']}: final val_acc {final.get('val_acc', float('nan')):.4f}, "
          f"test_acc {final.get('test_acc', float('nan')):.4f}; metrics in {out / 'metrics.json'}")
    return 0


def main() -> None:
    sys.exit(run_cli())


def __getattr__(name: str):
    # ssam_tune.train held the Trainer before the layer folders: old imports still resolve
    from ssam_tune._compat import moved_name

    return moved_name(__name__, name)


if __name__ == "__main__":
    main()
