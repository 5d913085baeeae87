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
import importlib.util
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

# old module -> where the rest of its names went, looked up after MOVED_MODULES' module (or
# after the module itself, for a module that still exists)
ALSO_IN = {
    "ssam_tune.train": "ssam_tune.training.trainer",      # the Trainer moved; train.py is the CLI now
    "ssam_tune.experiment": "ssam_tune.storage.files",    # atomic writes, is_uri, new_dir, swap_dir
    "ssam_tune.schedulers": "ssam_tune.tuning.ranking",   # MO-ASHA's ranking rule, Ray-free
    "ssam_tune.config": "ssam_tune.tuning.space",         # the tune: section's value sets
    "ssam_tune.run": "ssam_tune.tuning.tuner",            # PENDING_TRIALS, trial names, Ray start
}

# "old module.attribute" -> "new module:attribute", for single names moved elsewhere
MOVED_NAMES = {
    # pickled in tuner.pkl by versions before the schedulers had their own module
    "ssam_tune.search.AnchoredASHA": "ssam_tune.tuning.schedulers:AnchoredASHA",
    "ssam_tune.search.RungStateCallback": "ssam_tune.tuning.schedulers:RungStateCallback",
    # the trial-name functions are pickled in the tuner.pkl of experiments started through
    # run_search (by reference; run as python -m, run.py was __main__ and pickled them by value)
    "ssam_tune.run._trial_name": "ssam_tune.tuning.tuner:trial_name",
    "ssam_tune.run._trial_dirname": "ssam_tune.tuning.tuner:trial_dirname",
}

# Public names of 79462fa that no longer exist, and what replaces them (AttributeError says so)
REMOVED = {
    "ssam_tune.config.TuneConfig": "ssam_tune.tuning.space.TuneSettings (one dataclass for the tune: section)",
    "ssam_tune.config.SchedulerConfig": "fields of ssam_tune.tuning.space.TuneSettings",
    "ssam_tune.config.ResourcesConfig": "fields of ssam_tune.tuning.space.TuneSettings",
    "ssam_tune.config.ConfirmConfig": "fields of ssam_tune.tuning.space.TuneSettings",
    "ssam_tune.distributed.evaluate_distributed": "ssam_tune.training.trainer.Trainer.evaluate in a process group",
}


def moved_name(module: str, name: str):
    """The object an old ``module.name`` refers to now; AttributeError if there is none."""
    target = MOVED_NAMES.get(f"{module}.{name}")
    if target is not None:
        new_module, attr = target.split(":")
        return getattr(importlib.import_module(new_module), attr)
    if not (name.startswith("__") and name.endswith("__")):  # never import anything for a dunder
        for place in (MOVED_MODULES.get(module), ALSO_IN.get(module)):
            if place is not None and hasattr(found := importlib.import_module(place), name):
                return getattr(found, name)
    gone = REMOVED.get(f"{module}.{name}")
    raise AttributeError(f"module {module!r} has no attribute {name!r}" + (f"; use {gone}" if gone else ""))


class _OldModule(importlib.abc.Loader):
    """Makes ``ssam_tune.<old>``: an empty module whose attributes come from the new one."""

    def create_module(self, spec):
        return None  # a plain module object

    def exec_module(self, module: types.ModuleType) -> None:
        # Attribute lookups of dunders (``__file__``: torch's import scans sys.modules with
        # hasattr) must not import the new module, which may be half-imported at that moment.
        name = module.__name__
        module.__getattr__ = lambda attr: moved_name(name, attr)
        module.__doc__ = f"Moved: see {MOVED_MODULES[name]} (ssam_tune/_compat.py)."

    def get_code(self, fullname: str):
        """``python -m <old name>`` runs the new module's code (e.g. ``ssam_tune.train_cli``)."""
        new = MOVED_MODULES[fullname]
        return importlib.util.find_spec(new).loader.get_code(new)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, _OldModule())
        return None


def install() -> None:
    """Add the finder once, after Python's own finders (a real module is never shadowed)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
