"""sdmp_fast.pipelines: loaders (DALI, FFCV, torchvision, torch-gpu, memory) that yield SDMPBatch.

``make_loader(backend, data, recipe, batch_size, ...)`` is the one entry point; backends import their heavy
dependency only when chosen. ``adapters`` turns any loader into the batch format of DINO, MoCo v3, solo-learn,
lightly or a DataLoader-like object.
"""
from .base import BACKENDS, EmptyEpochError, EpochSampler, list_images, make_loader, resume_batches
from .recipes import MixSpec, Recipe, ViewSpec, byol2, dino, make_recipe
from .skips import UndecodableBatchError

__all__ = ["make_loader", "resume_batches", "EmptyEpochError", "UndecodableBatchError", "BACKENDS", "EpochSampler",
           "list_images", "Recipe",
           "ViewSpec", "MixSpec", "byol2", "dino", "make_recipe"]
