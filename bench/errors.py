"""One exception tree for pmoe-bench.

Every error a user can cause derives from :class:`BenchError`; the CLI turns those into a one-line message
and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BenchError(Exception):
    """Root of every user-facing error (bad scenario, unknown component, unreadable store...)."""


class ScenarioError(BenchError):
    """A scenario file that cannot be read or does not validate; the message names file and field."""


class UnknownComponentError(BenchError):
    """A component name that is not registered; the message suggests the closest names."""


class ComponentParamsError(BenchError):
    """Parameters that do not match a component's declared schema."""


class PluginError(BenchError):
    """A plugin file or package that cannot be loaded or registers something invalid."""


class StoreError(BenchError):
    """A results store that cannot be opened or read."""


class DataError(BenchError):
    """A data set that cannot be found or loaded (missing files, download disabled)."""
