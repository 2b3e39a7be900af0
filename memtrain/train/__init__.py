"""Front doors: wrap an existing loop (``prepare``) or run a YAML recipe (``run_recipe``)."""

from memtrain.train.prepare import Prepared, prepare
from memtrain.train.recipe import Recipe, load_recipe, validate
from memtrain.train.runner import run_recipe

__all__ = ["Prepared", "Recipe", "load_recipe", "prepare", "run_recipe", "validate"]
