"""The benchmarks: one module per part, run as ``python -m bench.<part>``.

``scripts/bench NAME`` is the entry command (it runs ``python -m bench.NAME``
from the checkout with the venv's interpreter); ``scripts/bench all`` runs
:mod:`bench.suite`. Shared pieces: :mod:`bench.load` (the process/thread load
generator) and ``tests/pgcluster.py`` (the throwaway PostgreSQL cluster, also
used by the tests). See docs/performance.md for the figures.
"""
