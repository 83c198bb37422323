"""Looking at what an SAE learned, on its source language model.

- :mod:`dictlearn.inspect.text`: the features each token of a text lights up.
- :mod:`dictlearn.inspect.dashboard`: feature dashboards (``dictlearn dashboard``): a static
  site and Neuronpedia JSON from one streaming pass over a corpus.
"""

from dictlearn.inspect.text import SourceModel, TokenFeatures, token_features

__all__ = ["SourceModel", "TokenFeatures", "token_features"]
