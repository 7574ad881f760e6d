"""Moved to :mod:`kvseg.experiments.sweep`.

This path keeps working for this release as an alias (the same module object, so attributes
and patches reach the real one). Import the new path."""

import sys

from kvseg.experiments import sweep as _module

sys.modules[__name__] = _module
