"""Model configs shipped as data, and builders that make random-weight models from them.

No weights are ever downloaded: presets are copies of public ``config.json`` files, and a local
``config.json`` (or a directory holding one) works the same way.
"""

from memtrain.models.build import build_causal_lm, causal_lm_layers
from memtrain.models.configs import load_config, preset_names

__all__ = ["build_causal_lm", "causal_lm_layers", "load_config", "preset_names"]
