"""Moved to :mod:`megarm.checkpoint` (the format shared by training, conversion and
scoring); this name stays only while code is being moved over."""

from megarm.checkpoint import *  # noqa: F403
from megarm.checkpoint import __all__  # noqa: F401
