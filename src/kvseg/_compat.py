"""The module paths of kvseg 0.1.0, kept working for this release.

Before the three wings (training/, inference/, experiments/) the workflow modules sat flat in
``kvseg``: ``kvseg.stats``, ``kvseg.checkpoint``, ``kvseg.train`` ... Scripts that import them keep
working: a finder on ``sys.meta_path`` answers an old path with the module at its new home (the
same module object, so attributes, ``from kvseg.stats import x`` and ``mock.patch`` targets reach
the real one), with a FutureWarning naming the new home. One table instead of 23 alias
files, so the package's top shows where things live.
Nothing inside kvseg imports an old path (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

#: old path -> new home
OLD_PATHS: dict[str, str] = {
    "kvseg.benchmark": "kvseg.inference.benchmark",
    "kvseg.checkpoint": "kvseg.training.checkpoint",
    "kvseg.distributed": "kvseg.training.distributed",
    "kvseg.evaluate": "kvseg.inference.evaluate",
    "kvseg.explain": "kvseg.inference.explain",
    "kvseg.export": "kvseg.inference.export",
    "kvseg.figures": "kvseg.experiments.figures",
    "kvseg.loaders": "kvseg.training.loaders",
    "kvseg.losses": "kvseg.training.losses",
    "kvseg.metrics": "kvseg.training.metrics",
    "kvseg.precision": "kvseg.training.precision",
    "kvseg.predict": "kvseg.inference.predict",
    "kvseg.presets": "kvseg.experiments.presets",
    "kvseg.profile": "kvseg.inference.profile",
    "kvseg.report": "kvseg.experiments.report",
    "kvseg.reproduce": "kvseg.experiments.reproduce",
    "kvseg.results": "kvseg.experiments.results",
    "kvseg.rundir": "kvseg.training.rundir",
    "kvseg.runner": "kvseg.experiments.runner",
    "kvseg.runtime": "kvseg.inference.runtime",
    "kvseg.stats": "kvseg.experiments.stats",
    "kvseg.sweep": "kvseg.experiments.sweep",
    "kvseg.train": "kvseg.training.train",
}


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        # FutureWarning, not DeprecationWarning: Python hides the latter unless raised in
        # __main__, and from inside the import machinery it never is
        warnings.warn(f"{spec.name} moved to {OLD_PATHS[spec.name]}; the old path still works "
                      "but will be removed in a later release",
                      FutureWarning, stacklevel=2)
        module = importlib.import_module(OLD_PATHS[spec.name])
        self.home_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the new home is already executed; importlib set its __spec__ to the alias's: put back
        # its own (importlib.reload and tools that read __spec__.name see the real module)
        module.__spec__ = self.home_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OLD_PATHS:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader())


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
