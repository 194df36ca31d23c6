"""Built-in models; importing this package registers them.

``pmoe`` (WRN-pMoE, Chowdhury et al. 2023), its preset ``pmoe-paper``, and the ``dense`` WRN baseline;
``vmoe`` (V-MoE, Riquelme et al. 2021: a ViT with sparse MoE MLPs), its preset ``vmoe-paper``, and the dense
``vit`` / ``vit-paper`` baselines.
"""

from __future__ import annotations

from bench.models import dense, pmoe, vit
from bench.models.base import BenchModel, Normalize, Routing
from bench.models.dense import DenseWRN
from bench.models.pmoe import PAPER_CONFIG, PMoE
from bench.models.vit import VMOE_PAPER_CONFIG, VisionMoE

__all__ = ["PAPER_CONFIG", "VMOE_PAPER_CONFIG", "BenchModel", "DenseWRN", "Normalize", "PMoE", "Routing",
           "VisionMoE", "dense", "pmoe", "vit"]
