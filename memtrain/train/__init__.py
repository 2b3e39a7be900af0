"""Front doors: wrap an existing loop (``prepare``) or run a YAML recipe (``run_recipe``)."""

from memtrain.train.loop import run_recipe
from memtrain.train.prepare import Prepared, prepare
from memtrain.train.recipe import load_recipe, validate

__all__ = ["Prepared", "load_recipe", "prepare", "run_recipe", "validate"]
