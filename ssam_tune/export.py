"""Placeholder; replaced by the real exporter."""
def export_experiment(exp_dir, out):
    from pathlib import Path
    Path(out).mkdir(parents=True, exist_ok=True)
