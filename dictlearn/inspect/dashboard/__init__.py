"""Feature dashboards: one streaming pass over a corpus, a static site, Neuronpedia JSON.

    dictlearn dashboard SAE_URL --out DIR [--tokens N] [--features 0,5] [--index URL]

- :mod:`~dictlearn.inspect.dashboard.collector`: per-feature top contexts, quantile samples,
  histogram and density in memory bounded by features x N, mergeable across workers.
- :mod:`~dictlearn.inspect.dashboard.weights`: promoted / suppressed tokens, neighbours.
- :mod:`~dictlearn.inspect.dashboard.site`: the HTML site and the Neuronpedia JSON.
- :mod:`~dictlearn.inspect.dashboard.run`: ``main(config)``, in-process or on Ray workers.
"""

from dictlearn.inspect.dashboard.collector import CollectorSpec, init_state, merge_states, update
from dictlearn.inspect.dashboard.config import DashboardConfig
from dictlearn.inspect.dashboard.run import DashboardResult, DashboardWorker, main

__all__ = [
    "CollectorSpec",
    "DashboardConfig",
    "DashboardResult",
    "DashboardWorker",
    "init_state",
    "main",
    "merge_states",
    "update",
]
