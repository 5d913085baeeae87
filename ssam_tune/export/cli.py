"""The command line, ``python -m ssam_tune.export EXPERIMENT_DIR [--out DIR] [--confirm DIR]``:
argument parsing, the one-line errors (exit code 2) and the closing report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssam_tune.export.build import export_experiment
from ssam_tune.export.confirm import export_confirmation
from ssam_tune.export.read import load_space_file
from ssam_tune.storage.experiment import RESULTS, SPACE_FILE, Experiment
from ssam_tune.storage.files import is_uri


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssam_tune.export",
                                description="Export an ssam_tune experiment: tables, front, configs, summary, "
                                            "TensorBoard.")
    p.add_argument("experiment", help="experiment folder (holds space.yaml and trial_*/)")
    p.add_argument("--out", default=None, help="output folder (default: results/<space name>)")
    p.add_argument("--confirm", default=None, metavar="DIR",
                   help="also summarise a confirmation experiment (front<k>_<label>/seed<s> trials)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 2 (one-line error) for a missing folder or a bad space.yaml."""
    from ssam_tune.training.config import ConfigError

    args = _parser().parse_args(argv)
    exp = args.experiment
    try:
        if not is_uri(exp):
            if not Path(exp).is_dir():
                raise FileNotFoundError(f"experiment folder not found: {exp}")
            if not (Path(exp) / SPACE_FILE).is_file():
                raise FileNotFoundError(f"{Path(exp) / SPACE_FILE}: not found (not an ssam_tune experiment folder?)")
            name = load_space_file(Path(exp) / SPACE_FILE).name
        else:
            name = Experiment(exp).name  # the folder's name is the space's (see Experiment.at)
        # A URI is checked by export_confirmation, once its files are listed.
        if args.confirm is not None and not is_uri(args.confirm) and not Path(args.confirm).is_dir():
            raise FileNotFoundError(f"confirmation experiment folder not found: {args.confirm}")
        out = Path(args.out) if args.out else RESULTS / name
        info = export_experiment(exp, out)
        if args.confirm is not None:
            export_confirmation(args.confirm, out)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # pyarrow: unknown scheme, no credentials, no bucket
        if not is_uri(exp):
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"error: cannot read {exp} ({type(err).__name__}: {first}); check the URI and the credentials",
              file=sys.stderr)
        return 2
    c = info["counts"]
    detail = ", ".join(f"{v} {k}" for k, v in c.items() if v)
    print(f"{info['n_trials']} trials{f' ({detail})' if detail else ''}; "
          f"front: {len(info['front'])} point(s); exports written to {info['out_dir']}/")
    return 0
