"""What runs: training entry points, models and data loaders built on :mod:`distkfac`.

- :mod:`jobs.data`: IDX (MNIST / Fashion-MNIST) reader and loaders, default data locations.
- :mod:`jobs.demo`: K-FAC vs momentum SGD on Fashion-MNIST (``python -m jobs.demo``, ``make demo``).
"""
