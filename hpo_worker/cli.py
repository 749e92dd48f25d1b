"""Command line: ``python -m hpo_worker driver|worker|report|status|server ...`` (docs/hpo.md).

Where the MongoDB URL comes from, first match wins: ``--mongo URL``, ``--mongo-file FILE`` (a file holding the URL:
keeps credentials out of ``ps`` and shell history), the environment variable ``HPO_MONGO_URL``, and otherwise the
embedded server of ``--data-dir`` (default ``hpo_data``): the driver starts one there (or reuses the one whose URL
is in ``<data-dir>/mongo-url``) and stops it when it ends; workers read ``<data-dir>/mongo-url``.
Exit status 2 with a one-line message for every setup error (unreachable server, credentials, unknown space, an
experiment that exists with other settings, ...); status 4 (``EXIT_STORE_UNREACHABLE``) with a one-line message when
the database went away later and did not come back within ``--db-patience`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hpo_worker.attempts import CHECKPOINT_EVERY_S
from hpo_worker.pending import PENDING_LIES, STARTUP_TRIALS
from hpo_worker.pruning import PRUNED_HISTORY, PRUNERS, PrunerSettings, check_objective
from hpo_worker.server import EmbeddedServer, ServerError, read_url_file
from hpo_worker.store import (
    DEFAULT_PATIENCE_S,
    ENV_PATIENCE,
    EXIT_STORE_UNREACHABLE,
    StoreError,
    StoreUnreachable,
    TrialStore,
    connect,
    mask_url,
)
from hpo_worker.trial import LAUNCHERS, OBJECTIVES, TrialLaunch
from hpo_worker.warm_start import WarmStartError, load_points

__all__ = ["EXIT_USAGE", "main"]

ENV_URL = "HPO_MONGO_URL"
EXIT_USAGE = 2  # a setup error: the message says what to fix


class UsageError(Exception):
    pass


def _add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MongoDB (default: the embedded server of --data-dir)")
    group.add_argument("--mongo", metavar="URL", help="mongodb://[user:password@]host[:port]/database[?options]")
    group.add_argument("--mongo-file", metavar="FILE", help="file holding the URL (keeps passwords out of ps)")
    group.add_argument("--data-dir", default="hpo_data", help="embedded server's directory (default: hpo_data)")
    group.add_argument("--timeout", type=float, default=5.0, help="seconds to reach the server (default: 5)")
    group.add_argument(
        "--db-patience",
        type=float,
        metavar="SECONDS",
        help=f"how long to wait for a database that went away (restart, failover) before exiting with status "
        f"{EXIT_STORE_UNREACHABLE} (default: ${ENV_PATIENCE}, else {DEFAULT_PATIENCE_S:g})",
    )


def _add_driver(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    driver = sub.add_parser("driver", help="propose trials with TPE and wait for max-evals results")
    _add_connection(driver)
    driver.add_argument("--exp", required=True, help="experiment name (exp_key)")
    driver.add_argument("--space", required=True, help="sgd | adam | kfac | path of a .toml space file")
    driver.add_argument("--config", required=True, help="base jobs.train TOML config of every trial")
    driver.add_argument("--max-evals", type=int, required=True)
    driver.add_argument("--queue-size", type=int, default=4, help="queued trials kept ready for workers (default 4)")
    driver.add_argument("--seed", type=int, default=0)
    driver.add_argument("--grace", type=float, default=60.0, help="seconds without heartbeat before a requeue")
    driver.add_argument("--max-retries", type=int, default=2, help="requeues of a trial before it is failed")
    driver.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="test_loss",
        help="what TPE minimises: test_loss, test_error (1 - test accuracy), train_error (1 - train accuracy), "
        "steps_to_target (fraction of the step budget to reach run.target_accuracy; misses rank last), "
        "best_test_error (1 - the best test accuracy over the run's evaluations: a fixed budget, no early stop)",
    )
    driver.add_argument("--poll", type=float, default=0.5, help="seconds between rounds (default 0.5)")
    driver.add_argument(
        "--idle-poll",
        type=float,
        default=0.0,
        help="rounds that see no change in the trials wait longer, doubling up to this many seconds (at most 10; "
        "default 0: always --poll)",
    )
    driver.add_argument(
        "--pending",
        choices=PENDING_LIES,
        default="worst",
        help="what TPE is told about queued and running trials: the worst, mean or best finished loss (default "
        "worst), inf (hyperopt's own: an infinite loss), or ignore (left out); docs/hpo.md",
    )
    driver.add_argument(
        "--startup-trials",
        type=int,
        default=STARTUP_TRIALS,
        help=f"trials drawn at random from the space before TPE models the history (hyperopt's n_startup_jobs, "
        f"default {STARTUP_TRIALS})",
    )
    driver.add_argument(
        "--warm-start",
        metavar="FILE",
        help="TOML file of [[points]] (every parameter of the space) queued as the first trials; docs/hpo.md",
    )
    _add_pruner(driver)


def _add_pruner(driver: argparse.ArgumentParser) -> None:
    group = driver.add_argument_group("pruning (default: off; docs/hpo.md)")
    group.add_argument(
        "--pruner", choices=PRUNERS, default="none",
        help="stop trials that are behind at an evaluation: median (median stopping) or asha (successive halving)",
    )  # fmt: skip
    group.add_argument("--prune-warmup-steps", type=int, default=0, help="median: steps before any stop (>= 1)")
    group.add_argument("--prune-min-trials", type=int, default=1, help="median: completed trials before any stop")
    group.add_argument("--asha-min-fraction", type=float, default=0.1, help="asha: first rung, budget fraction")
    group.add_argument("--asha-reduction-factor", type=int, default=3, help="asha: 1 in N goes on at a rung (>= 2)")
    group.add_argument(
        "--pruned-history", choices=PRUNED_HISTORY, default="last",
        help="what TPE sees of a pruned trial: its last intermediate value as its loss (default), or nothing",
    )  # fmt: skip
    group.add_argument(
        "--prune-behind-best", action="store_true",
        help="steps_to_target: stop a trial once it is past the steps an earlier completed trial needed to reach the "
        "target (exact: it can no longer beat that trial); with --pruner or alone",
    )  # fmt: skip
    group.add_argument(
        "--prune-threshold", type=float, metavar="VALUE",
        help="stop a trial whose best value so far is still >= VALUE once it has trained --prune-threshold-after of "
        "its budget (e.g. steps_to_target: 1 + target - 0.11, a 10-class run still at chance); with --pruner or alone",
    )  # fmt: skip
    group.add_argument(
        "--prune-threshold-after", type=float, default=0.0, metavar="FRACTION",
        help="the budget fraction a trial trains before --prune-threshold applies (default 0)",
    )  # fmt: skip


def _add_worker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = sub.add_parser("worker", help="run queued trials as jobs training runs")
    _add_connection(worker)
    worker.add_argument("--exp", help="only this experiment (default: any)")
    worker.add_argument("--idle-timeout", type=float, default=60.0, help="exit after this long without work")
    worker.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats (default 5)")
    worker.add_argument("--workdir", default="hpo_runs", help="where trial runs are written (default hpo_runs)")
    worker.add_argument("--max-trials", type=int, default=0, help="exit after this many trials (0 = no limit)")
    worker.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="while idle, requeue trials without heartbeat for this long (0 = leave it to the driver)",
    )
    worker.add_argument("--max-retries", type=int, default=2)
    worker.add_argument(
        "--checkpoint-every-s", type=float, default=CHECKPOINT_EVERY_S, metavar="SECONDS",
        help=f"each trial checkpoints this often, and a trial reserved again continues from its earlier attempt's "
        f"newest checkpoint (default {CHECKPOINT_EVERY_S:g}; 0 = only at the end)",
    )  # fmt: skip
    worker.add_argument("--poll", type=float, default=0.2, help="seconds between polls of an empty queue")
    trials = worker.add_argument_group("distributed trials (default: each trial in this process, one rank)")
    trials.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="none",
        help="run each trial as --ranks ranks of `python -m jobs.train` under srun (inside the worker's allocation), "
        "mpirun or torchrun",
    )
    trials.add_argument("--ranks", type=int, default=1, help="ranks per trial (default 1)")
    trials.add_argument(
        "--launcher-args", default="", help="extra launcher words, as shell text (e.g. '--bind-to none')"
    )


def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser("report", help="best trials, the mean of the top k, CSV and plots of an experiment")
    _add_connection(report)
    report.add_argument("--exp", required=True, help="experiment name")
    report.add_argument("--top-k", type=int, default=100, help="how many of the best trials to average (default 100)")
    report.add_argument("--csv", metavar="FILE", help="write one row per trial here")
    report.add_argument("--plots", metavar="DIR", help="write loss-by-trial and parameter-vs-loss PNGs here")
    report.add_argument("--json", metavar="FILE", help="write every trial (params, result, no curves) as JSON here")
    report.add_argument("--html", metavar="FILE", help="write one self-contained page (tables, plots inline) here")
    report.add_argument(
        "--watch", type=float, default=0, metavar="SECONDS",
        help="with --html: write the page again every SECONDS until the experiment has its trials",
    )  # fmt: skip


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="trials per state, best so far, workers alive, rate and ETA")
    _add_connection(status)
    status.add_argument("--exp", action="append", required=True, help="experiment name (repeat for several)")
    status.add_argument(
        "--watch", type=float, default=0, metavar="SECONDS", help="redraw every SECONDS until all have finished"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpo_worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_driver(sub)
    _add_worker(sub)
    _add_report(sub)
    _add_status(sub)
    server = sub.add_parser("server", help="run the embedded nx-27017 server in the foreground")
    server.add_argument("--data-dir", default="hpo_data")
    server.add_argument("--port", type=int, default=0, help="default: a free port (written to DATA_DIR/mongo-url)")
    return parser.parse_args(argv)


def _explicit_url(args: argparse.Namespace) -> str | None:
    if args.mongo:
        return str(args.mongo)
    if args.mongo_file:
        return read_url_file(args.mongo_file)
    return os.environ.get(ENV_URL) or None


@contextlib.contextmanager
def _store(args: argparse.Namespace, *, may_start: bool) -> Iterator[TrialStore]:
    url = _explicit_url(args)
    server: EmbeddedServer | None = None
    if url is None:
        url_file = Path(args.data_dir) / "mongo-url"
        if url_file.exists():
            url = read_url_file(url_file)
            if may_start:
                try:
                    connect(url, timeout_s=1.0).close()
                except StoreError:  # a stale file from a server that is gone
                    url = None
        elif not may_start:
            raise ServerError(
                f"no embedded server in {args.data_dir} ({url_file} is missing): start the driver first, or "
                f"`python -m hpo_worker server --data-dir {args.data_dir}`, or pass --mongo URL"
            )
        if url is None:
            server = EmbeddedServer(args.data_dir)
            url = server.start()
            print(f"hpo_worker: embedded nx-27017 at {url} (data in {server.data_dir})", file=sys.stderr, flush=True)
    try:
        if args.db_patience is not None and not 0 < args.db_patience < float("inf"):
            raise UsageError(f"--db-patience must be a positive number of seconds, not {args.db_patience:g}")
        store = connect(url, timeout_s=args.timeout, patience_s=args.db_patience)
        try:
            yield store
        finally:
            store.close()
    finally:
        if server is not None:
            server.stop()


def _driver(args: argparse.Namespace) -> int:
    from hpo_worker.driver import DriverOptions, run_driver
    from hpo_worker.spaces import load_space

    if args.max_evals < 1 or args.queue_size < 1 or args.startup_trials < 1:
        raise UsageError("--max-evals, --queue-size and --startup-trials must be at least 1")
    try:
        space = load_space(args.space)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not Path(args.config).is_file():
        raise UsageError(f"base config {args.config} does not exist: give a jobs.train TOML file (jobs/configs/)")
    from jobs.config import ConfigError, load_config

    try:
        base = load_config(args.config)
    except (ConfigError, FileNotFoundError) as exc:
        raise UsageError(f"base config {args.config}: {exc}") from exc
    if args.objective == "steps_to_target" and not base.run.target_accuracy:
        raise UsageError(
            f"--objective steps_to_target needs run.target_accuracy (and run.eval_every_steps) in {args.config}"
        )
    try:
        points = load_points(args.warm_start, space) if args.warm_start else []
    except WarmStartError as exc:
        raise UsageError(str(exc)) from exc
    if len(points) > args.max_evals:
        raise UsageError(f"{len(points)} warm-start points but --max-evals {args.max_evals}: raise --max-evals")
    options = DriverOptions(
        exp_key=args.exp, space=space, config_path=args.config, max_evals=args.max_evals,
        queue_size=args.queue_size, seed=args.seed, grace_s=args.grace, max_retries=args.max_retries,
        objective=args.objective, poll_s=args.poll, idle_poll_s=args.idle_poll, pending=args.pending,
        warm_start=tuple(points),
        pruner=_pruner(args, base.run.eval_every or base.run.eval_every_steps), startup_trials=args.startup_trials,
    )  # fmt: skip
    with _store(args, may_start=True) as store:
        return run_driver(store, options)


def _pruner(args: argparse.Namespace, evaluates: int) -> PrunerSettings:
    """The pruner's settings; a pruner needs runs that evaluate while they train (or epochs, for train_error)."""
    try:
        settings = PrunerSettings(
            args.pruner, args.prune_warmup_steps, args.prune_min_trials, args.asha_min_fraction,
            args.asha_reduction_factor, args.pruned_history, args.prune_behind_best, args.prune_threshold,
            args.prune_threshold_after,
        )  # fmt: skip
        check_objective(settings, args.objective)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if settings.active and not evaluates and args.objective != "train_error":
        which = f"--pruner {settings.name}" if settings.name != "none" else "--prune-behind-best or --prune-threshold"
        raise UsageError(
            f"{which} compares the trials' evaluations while they train, and {args.config} has "
            "none (run.eval_every = 0, run.eval_every_steps = 0): set one of them"
        )
    return settings


def _worker(args: argparse.Namespace) -> int:
    from hpo_worker.worker import WorkerOptions, run_worker

    try:
        launch = TrialLaunch(args.launcher, args.ranks, tuple(shlex.split(args.launcher_args)))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if launch.launcher != "none" and shutil.which(launch.command([])[0]) is None:
        raise UsageError(f"--launcher {launch.launcher}: {launch.command([])[0]} is not on PATH")
    if args.checkpoint_every_s < 0:
        raise UsageError(f"--checkpoint-every-s must be >= 0 (0 = only at the end), not {args.checkpoint_every_s:g}")
    options = WorkerOptions(
        exp_key=args.exp, workdir=args.workdir, idle_timeout_s=args.idle_timeout, heartbeat_s=args.heartbeat,
        poll_s=args.poll, max_trials=args.max_trials, grace_s=args.grace, max_retries=args.max_retries,
        launch=launch, checkpoint_every_s=args.checkpoint_every_s,
    )  # fmt: skip
    with _store(args, may_start=False) as store:
        return run_worker(store, options)


def _report(args: argparse.Namespace) -> int:
    from hpo_worker import report

    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.watch and not args.html:
        raise UsageError("--watch rewrites the --html page: give --html FILE")
    with _store(args, may_start=False) as store:
        if store.get_experiment(args.exp) is None:
            raise UsageError(f"no experiment {args.exp!r} in this database: check --exp (and the URL)")
        if args.html:
            _html(store, args)
        trials = store.trial_docs(args.exp)
    print(report.format_report(report.summarize(trials, top_k=args.top_k)))
    if args.csv:
        print(f"csv: {report.write_csv(trials, args.csv)}")
    if args.plots:
        for path in report.plot(trials, args.plots):
            print(f"plot: {path}")
    if args.json:
        print(f"json: {report.write_trials_json(trials, args.json)}")
    return 0


def _html(store: TrialStore, args: argparse.Namespace) -> None:
    """Writes the page, once or (--watch) until the experiment has its max-evals trials finished."""
    from hpo_worker.html_report import write_html
    from hpo_worker.status import experiment_status, watch

    def page() -> list[Any]:
        status = experiment_status(store, args.exp)
        path = write_html(args.html, args.exp, store.trial_docs(args.exp), status, args.top_k, args.watch)
        print(f"html: {path} ({status.finished}/{status.max_evals or '?'} finished)", flush=True)
        return [status]

    if args.watch:
        with open(os.devnull, "w") as quiet:
            watch(page, args.watch, out=quiet)
    else:
        page()


def _status(args: argparse.Namespace) -> int:
    from hpo_worker.status import experiment_status, format_status, watch

    with _store(args, may_start=False) as store:
        unknown = [exp for exp in args.exp if store.get_experiment(exp) is None]
        if unknown:
            raise UsageError(f"no experiment {unknown[0]!r} in this database: check --exp (and the URL)")
        if args.watch:
            watch(lambda: [experiment_status(store, exp) for exp in args.exp], args.watch)
        else:
            print(format_status([experiment_status(store, exp) for exp in args.exp]))
    return 0


def _server(args: argparse.Namespace) -> int:
    server = EmbeddedServer(args.data_dir, port=args.port)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with server:
        print(f"hpo_worker: nx-27017 at {server.url}, URL in {server.url_file}; Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                print("hpo_worker server: error: nx-27017 exited", file=sys.stderr)
                return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handlers = {"driver": _driver, "worker": _worker, "report": _report, "status": _status, "server": _server}
    try:
        return handlers[args.command](args)
    except StoreUnreachable as exc:  # after the wait: one line, its own status (the study tells it apart)
        print(f"hpo_worker {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_STORE_UNREACHABLE
    except (UsageError, StoreError, ServerError) as exc:
        message = mask_url(str(exc))
        print(f"hpo_worker {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
