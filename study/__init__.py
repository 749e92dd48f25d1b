"""Batch-size scaling study: train each (variant, optimizer, batch size) cell with tuned or given hyperparameters and
measure steps to a target accuracy (the runner), fit the critical batch size and estimate the gradient noise scale
(:mod:`study.fit`, :mod:`jobs.noise_scale`), and write the study's CSV, fits, plots and markdown report
(:mod:`study.report`).
"""
