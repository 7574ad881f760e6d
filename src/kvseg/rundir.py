"""Moved to :mod:`kvseg.training.rundir`; this path keeps working for this release (an alias: the
same module object, so attributes and patches reach the real one). Import the new path."""

import sys

from kvseg.training import rundir as _module

sys.modules[__name__] = _module
