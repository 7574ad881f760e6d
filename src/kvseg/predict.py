"""Moved to :mod:`kvseg.inference.predict`.

This path keeps working for this release as an alias (the same module object, so attributes
and patches reach the real one). Import the new path."""

import sys

from kvseg.inference import predict as _module

sys.modules[__name__] = _module
