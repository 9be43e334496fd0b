"""sdmp-fast: throughput-first SDMP (Simple Data Mixing Prior) pretraining for Vision Transformers.

The core (batch type, mixing, reference losses) imports with torch alone; DALI / FFCV are optional and only
imported by the backends that need them.
"""
from .batch import SDMPBatch
from .mixing import sdmp_mix
from .losses import mix_coefficient, sdmp_moco_terms, sdmp_dino_terms

__version__ = "0.1.0"
__all__ = ["SDMPBatch", "sdmp_mix", "mix_coefficient", "sdmp_moco_terms", "sdmp_dino_terms", "__version__"]
