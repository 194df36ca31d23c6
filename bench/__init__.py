"""pmoe-bench: backdoor attacks and defenses on patch-level Mixture-of-Experts image classifiers."""

from __future__ import annotations

__version__ = "0.1.0"
