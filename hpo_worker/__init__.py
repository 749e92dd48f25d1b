"""hpo_worker: hyperparameter search for ``jobs`` training runs, coordinated through MongoDB.

hyperopt's TPE proposes trials (:mod:`hpo_worker.driver`); workers reserve them atomically and run them as
``jobs`` training runs (:mod:`hpo_worker.worker`); trials live in MongoDB in hyperopt's document schema
(:mod:`hpo_worker.store`), as JSON specs, never as pickled code. Without a MongoDB URL an embedded nx-27017
server is used (:mod:`hpo_worker.server`). Command line: :mod:`hpo_worker.cli`; documentation: docs/hpo.md.
"""

__all__: list[str] = []
