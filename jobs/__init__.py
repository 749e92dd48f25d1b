"""What runs: training jobs built on :mod:`distkfac`, from a TOML configuration (``python -m jobs.train``).

- :mod:`jobs.train`: the command line; :mod:`jobs.config`: the configuration's keys and checks.
- :mod:`jobs.loop`: the training loop (:class:`jobs.loop.TrainingRun`; :func:`jobs.loop.run_training`).
- :mod:`jobs.parallel`: a run's place among the ranks and its communicator; :mod:`launch` starts and joins them.
- :mod:`jobs.models`, :mod:`jobs.data`, :mod:`jobs.datasets`, :mod:`jobs.optim`, :mod:`jobs.optimizers`: what trains.
- :mod:`jobs.checkpoint`, :mod:`jobs.metrics`, :mod:`jobs.files`: what a run writes; :mod:`jobs.outcome`: how it
  says it ended (``summary.json``, the exit status).
- :mod:`jobs.noise_scale`: the gradient noise scale measured during training.

Batch-size studies are the top-level ``study`` package, built on ``jobs`` and ``hpo_worker``.

A plain K-FAC vs momentum SGD comparison without any of this: ``python examples/kfac_vs_sgd.py``.
"""
