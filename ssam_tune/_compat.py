"""Old module paths, resolved: the ONE table of where things moved.

Ray pickles the search's objects by module path (``tuner.pkl``: the scheduler, the callbacks,
the trial-name functions; the searcher state: ``SsamSearcher`` and the ``SearchSpace`` it
holds), so an experiment started by a release with the flat layout (up to 79462fa) names
``ssam_tune.search.SsamSearcher``, ``ssam_tune.schedulers.MOASHA``, ... . Users' scripts
import ``ssam_tune.optim``, ``ssam_tune.fisher``, ``ssam_tune.models``. Both keep working:
:func:`install` (called once by ``ssam_tune/__init__.py``) adds a finder that answers ONLY
for the old names below, with a small module that hands out the new module's attributes
(the same objects, so pickles and ``isinstance`` agree). Real modules always win: the
finder sits after Python's own. ``tests/test_compat.py`` resumes and exports an experiment
written by 79462fa.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# old module -> new module (every attribute of the old one is the new one's)
MOVED_MODULES = {
    "ssam_tune.methods": "ssam_tune.method.methods",
    "ssam_tune.optim": "ssam_tune.method.optim",
    "ssam_tune.masks": "ssam_tune.method.masks",
    "ssam_tune.fisher": "ssam_tune.method.fisher",
    "ssam_tune.flops": "ssam_tune.method.flops",
    "ssam_tune.config": "ssam_tune.training.config",
    "ssam_tune.models": "ssam_tune.training.models",
    "ssam_tune.data": "ssam_tune.training.data",
    "ssam_tune.batches": "ssam_tune.training.batches",
    "ssam_tune.distributed": "ssam_tune.training.distributed",
    "ssam_tune.train_cli": "ssam_tune.train",
    "ssam_tune.experiment": "ssam_tune.storage.experiment",
    "ssam_tune.space": "ssam_tune.tuning.space",
    "ssam_tune.study": "ssam_tune.tuning.study",
    "ssam_tune.search": "ssam_tune.tuning.search",
    "ssam_tune.schedulers": "ssam_tune.tuning.schedulers",
    "ssam_tune.trainable": "ssam_tune.tuning.trainable",
    "ssam_tune.progress": "ssam_tune.tuning.progress",
    "ssam_tune.retention": "ssam_tune.tuning.retention",
    "ssam_tune._private": "ssam_tune.tuning._private",
    "ssam_tune.tensorboard_live": "ssam_tune.export.live",
}

# "old module.attribute" -> "new module:attribute", for names that moved out of a module that
# still exists (or moved between modules before this table existed)
MOVED_NAMES = {
    # pickled in tuner.pkl by versions before the schedulers had their own module
    "ssam_tune.search.AnchoredASHA": "ssam_tune.tuning.schedulers:AnchoredASHA",
    "ssam_tune.search.RungStateCallback": "ssam_tune.tuning.schedulers:RungStateCallback",
    # ssam_tune.train is the training command line now; the Trainer lives in training/trainer.py
    "ssam_tune.train.Trainer": "ssam_tune.training.trainer:Trainer",
    "ssam_tune.train.load_checkpoint": "ssam_tune.training.trainer:load_checkpoint",
    "ssam_tune.train.save_checkpoint": "ssam_tune.training.trainer:save_checkpoint",
    "ssam_tune.train.load_data": "ssam_tune.training.trainer:load_data",
    "ssam_tune.train.build_model": "ssam_tune.training.models:build_model",
    "ssam_tune.experiment.atomic_write": "ssam_tune.storage.files:atomic_write",
    "ssam_tune.experiment.is_uri": "ssam_tune.storage.files:is_uri",
    # the tune: section's value sets live with its one dataclass (tuning/space.py:TuneSettings)
    "ssam_tune.config.OBJECTIVES": "ssam_tune.tuning.space:OBJECTIVES",
    "ssam_tune.config.SAMPLERS": "ssam_tune.tuning.space:SAMPLERS",
    "ssam_tune.config.BASELINES": "ssam_tune.tuning.space:BASELINES",
    "ssam_tune.config.COST_METRICS": "ssam_tune.tuning.space:COST_METRICS",
    "ssam_tune.config.SCHEDULERS": "ssam_tune.tuning.space:SCHEDULERS",
    "ssam_tune.config.RETAIN": "ssam_tune.tuning.space:RETAIN",
    # the Ray Tune experiment is built in tuning/tuner.py now: the trial-name functions are
    # pickled in the tuner.pkl of experiments started through run_search (by reference; run
    # as python -m, run.py was __main__ and pickled them by value); PENDING_TRIALS was in
    # run.__all__
    "ssam_tune.run._trial_name": "ssam_tune.tuning.tuner:trial_name",
    "ssam_tune.run._trial_dirname": "ssam_tune.tuning.tuner:trial_dirname",
    "ssam_tune.run.PENDING_TRIALS": "ssam_tune.tuning.tuner:PENDING_TRIALS",
}


def moved_name(module: str, name: str):
    """The object an old ``module.name`` refers to now; AttributeError if it never moved."""
    target = MOVED_NAMES.get(f"{module}.{name}")
    if target is not None:
        new_module, attr = target.split(":")
        return getattr(importlib.import_module(new_module), attr)
    if module in MOVED_MODULES:
        return getattr(importlib.import_module(MOVED_MODULES[module]), name)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


class _OldModule(importlib.abc.Loader):
    """Makes ``ssam_tune.<old>``: an empty module whose attributes come from the new one."""

    def create_module(self, spec):
        return None  # a plain module object

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        module.__getattr__ = lambda attr: moved_name(name, attr)
        module.__doc__ = f"Moved: see {MOVED_MODULES[name]} (ssam_tune/_compat.py)."


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, _OldModule())
        return None


def install() -> None:
    """Add the finder once, after Python's own finders (a real module is never shadowed)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
