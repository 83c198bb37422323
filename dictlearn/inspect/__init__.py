"""Looking at what an SAE learned, on its source language model.

- :mod:`dictlearn.inspect.text`: the features each token of a text lights up.
- :mod:`dictlearn.inspect.edits`: interventions made of an SAE (splice, steer, clamp, ablate).
- :mod:`dictlearn.inspect.evaluate`: ``dictlearn eval``, the SAE spliced into its LM.
- :mod:`dictlearn.inspect.steer`: ``dictlearn steer``, generation with a feature steered.
- :mod:`dictlearn.inspect.dashboard`: feature dashboards (``dictlearn dashboard``): a static
  site and Neuronpedia JSON from one streaming pass over a corpus.
"""

from dictlearn.inspect.edits import ablate_feature, clamp_feature, splice, steer_feature
from dictlearn.inspect.text import SourceModel, TokenFeatures, token_features

__all__ = [
    "SourceModel",
    "TokenFeatures",
    "ablate_feature",
    "clamp_feature",
    "splice",
    "steer_feature",
    "token_features",
]
