"""Built-in models; importing this package registers them.

``pmoe`` (WRN-pMoE, Chowdhury et al. 2023), its preset ``pmoe-paper``, and the ``dense`` WRN baseline.
"""

from __future__ import annotations

from bench.models import dense, pmoe
from bench.models.base import BenchModel, Normalize, Routing
from bench.models.dense import DenseWRN
from bench.models.pmoe import PAPER_CONFIG, PMoE

__all__ = ["PAPER_CONFIG", "BenchModel", "DenseWRN", "Normalize", "PMoE", "Routing", "dense", "pmoe"]
