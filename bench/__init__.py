"""pmoe-bench: backdoor attacks and defenses on patch-level Mixture-of-Experts image classifiers.

``import bench`` gives the Python API (:class:`bench.api.Study`): ``bench.Study.from_file(path)`` or
``bench.Study.from_dict(scenario)``, then ``.plan()``, ``.run()``, ``.results()``, ``.dataframe()``,
``.report()``. The API is imported on first use, so the command line does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bench.api import Study

__all__ = ["Study", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Study":
        from bench.api import Study

        return Study
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
