"""Moved to the top-level package :mod:`study` (it drives hpo_worker, which depends on jobs, so it sits above both).

Only ``python -m jobs.study`` is kept, for one release, by forwarding (:mod:`jobs.study.__main__`); jobs never imports
the study.
"""
