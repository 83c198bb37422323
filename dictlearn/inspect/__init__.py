"""Looking at what an SAE learned, on its source language model.

- :mod:`dictlearn.inspect.text`: the features each token of a text lights up.
"""

from dictlearn.inspect.text import SourceModel, TokenFeatures, token_features

__all__ = ["SourceModel", "TokenFeatures", "token_features"]
