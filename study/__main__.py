"""``python -m study scaling --config STUDY.toml``: a batch-size scaling study (docs/study.md);
``python -m study fisher --config STUDY.toml``: the Fisher spectrum and gradient outliers of a study's runs over
training (docs/fisher.md);
``python -m study hinf-xor --config STUDY.toml``: seed 001's XOR study, epochs to converge against depth for g-EHF,
Adam and steepest descent (docs/hinf.md);
``python -m study saddle --config STUDY.toml``: seed 004's saddle-to-saddle study, plateaus and steps to target against
the initial scale for gradient descent and plateau skipping (docs/saddle.md);
``python -m study status --config STUDY.toml [--watch SECONDS]``: the live view of a tuned study's cells (docs/hpo.md);
``python -m study save --config STUDY.toml --to DIR`` and ``restore --from DIR``: a tuned study's progress as text
files, carried to another machine, past a scratch purge or into version control (docs/study.md).

Examples::

    python -m study scaling --config jobs/configs/studies/demo.toml            # what `make demo` runs
    python -m study scaling --config jobs/configs/studies/lenet_cifar10_paper.toml --workers 0 \\
        --mongo-file ~/.hpo-url        # drive only; workers come from a job array (docs/study.md)
    python -m study scaling --config STUDY.toml --check                     # validate, train nothing
    python -m study scaling --config STUDY.toml --seeds 0                   # one study seed now, the rest later
    python -m study fisher --config jobs/configs/studies/fisher_mnist.toml   # seed 003's figures (docs/fisher.md)
    python -m study hinf-xor --config jobs/configs/studies/hinf_xor.toml     # seed 001's Tables 1 and 2
    python -m study hinf-xor --config jobs/configs/studies/hinf_xor.toml --methods adam --depths 5,101
    python -m study saddle --config jobs/configs/studies/saddle.toml --cases teacher   # seed 004's Figures 1, 2
    python -m study save --config STUDY.toml --to state/   # then, on a fresh machine: restore --from state/

Exit status: 0 when the report is written, 2 for a bad study file (nothing was trained), 1 when a run or the tuning
failed (the message says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from study.config import StudyConfig, StudyError, check_cells, load_study

__all__ = ["main"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    scaling = sub.add_parser("scaling", help="steps to target against batch size, per optimizer, each cell tuned")
    scaling.add_argument("--config", required=True, help="study file (jobs/configs/studies/)")
    scaling.add_argument("--out", help="output folder (default: the file's study.out_dir)")
    scaling.add_argument("--workers", type=int, help="local hpo workers (replaces tune.workers; 0 = external ones)")
    scaling.add_argument("--trials", type=int, help="trials per cell (replaces tune.trials)")
    scaling.add_argument("--mongo", help="MongoDB URL (replaces tune.mongo); default: the embedded server")
    scaling.add_argument("--mongo-file", help="file holding the MongoDB URL (keeps a password out of ps)")
    scaling.add_argument(
        "--seeds", help="run only these of study.seeds now, e.g. 0 or 0,1 (the rest stay for a later run)"
    )
    scaling.add_argument("--check", action="store_true", help="check the study file and every cell's config, then exit")
    report = sub.add_parser(
        "report",
        help="draw a finished study's report again from its runs.csv and trials (--interim: one still running)",
    )
    report.add_argument("--config", required=True, help="study file (jobs/configs/studies/)")
    report.add_argument("--out", help="output folder (default: the file's study.out_dir)")
    report.add_argument(
        "--interim", action="store_true",
        help="a study still running or stopped early: draw the report from the trials finished so far into "
        "<out>/interim/ (search trials only, no repeats)",
    )  # fmt: skip
    status = sub.add_parser("status", help="a tuned study's cells: trials per state, best, workers, rate, ETA")
    status.add_argument("--config", required=True, help="study file (jobs/configs/studies/)")
    status.add_argument("--out", help="output folder (default: the file's study.out_dir)")
    status.add_argument("--mongo", help="MongoDB URL (replaces tune.mongo); default: the running study's server")
    status.add_argument("--mongo-file", help="file holding the MongoDB URL (keeps a password out of ps)")
    status.add_argument("--watch", type=float, default=0, metavar="SECONDS", help="redraw every SECONDS")
    for name, flag, helps in (
        ("save", "--to", "write a tuned study's database and finished runs as text files"),
        ("restore", "--from", "restore a save into an empty output folder, then continue"),
    ):
        carry = sub.add_parser(name, help=helps)
        carry.add_argument("--config", required=True, help="study file (jobs/configs/studies/)")
        carry.add_argument("--out", help="output folder (default: the file's study.out_dir)")
        carry.add_argument(flag, dest="folder", required=True, help="the save's folder")
    fisher = sub.add_parser("fisher", help="a study with given values and a [fisher] table: spectra, outliers, report")
    fisher.add_argument("--config", required=True, help="study file with [given] and [fisher] tables")
    fisher.add_argument("--out", help="output folder (default: the file's study.out_dir)")
    fisher.add_argument("--seeds", help="run only these of study.seeds now, e.g. 0 or 0,1")
    fisher.add_argument("--check", action="store_true", help="check the study file and every cell's config, then exit")
    hinf = sub.add_parser("hinf-xor", help="seed 001's XOR study: epochs to converge against depth (docs/hinf.md)")
    hinf.add_argument("--config", required=True, help="study file with [task] and [methods.NAME] tables")
    hinf.add_argument("--out", help="output folder (default: the file's study.out_dir)")
    hinf.add_argument("--methods", default="", help="only these methods now, e.g. g-EHF,adam (the rest later)")
    hinf.add_argument("--depths", default="", help="only these depths now, e.g. 5,101")
    hinf.add_argument("--report", action="store_true", help="write the report from the results so far; train nothing")
    hinf.add_argument("--check", action="store_true", help="check the study file, then exit")
    saddle = sub.add_parser("saddle", help="seed 004's plateaus and plateau skipping against scale (docs/saddle.md)")
    saddle.add_argument("--config", required=True, help="study file with [cases.NAME] and [methods.NAME] tables")
    saddle.add_argument("--out", help="output folder (default: the file's study.out_dir)")
    saddle.add_argument("--cases", default="", help="only these cases now, e.g. teacher (the rest later)")
    saddle.add_argument("--report", action="store_true", help="write the report from the runs so far; train nothing")
    saddle.add_argument("--check", action="store_true", help="check the study file and every run's config, then exit")
    return parser.parse_args(argv)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A scheduler's walltime: unwind, so that the runner stops its workers (their trials go back in the queue).
    raise KeyboardInterrupt


def _seed_subset(seeds: tuple[int, ...], text: str) -> tuple[int, ...]:
    """``--seeds 0,2``: those study seeds, which must be among the file's (their experiments keep their names, so a
    later run with all seeds continues them)."""
    try:
        chosen = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise StudyError(f"--seeds {text!r}: give study seeds separated by commas, e.g. --seeds 0,1") from None
    unknown = sorted(set(chosen) - set(seeds))
    if unknown:
        raise StudyError(f"--seeds {text!r}: {unknown} not in the study file's study.seeds {list(seeds)}")
    return chosen


def _for_fisher(study: StudyConfig) -> None:
    if study.fisher is None or study.tune is not None:
        raise StudyError(
            f"{study.path}: python -m study fisher needs a study with given values ([given]) and a [fisher] table "
            "(example: jobs/configs/studies/fisher_mnist.toml); a tuned study diagnoses its best runs with "
            "python -m study scaling"
        )


def _load(args: argparse.Namespace) -> StudyConfig:
    """The study file with the command line's replacements; StudyError when either is wrong."""
    study = load_study(args.config, out_dir=args.out)
    if args.command == "fisher":
        _for_fisher(study)
    elif study.tune is not None:
        mongo = Path(args.mongo_file).read_text().strip() if args.mongo_file else args.mongo
        changes = {"workers": args.workers, "trials": args.trials, "mongo": mongo}
        for key, value in changes.items():
            if value is not None and isinstance(value, int) and value < (1 if key == "trials" else 0):
                raise StudyError(f"--{key} must be at least {1 if key == 'trials' else 0}, not {value}")
        tune = dataclasses.replace(study.tune, **{k: v for k, v in changes.items() if v is not None})
        study = dataclasses.replace(study, tune=tune)
    elif args.workers is not None or args.trials is not None or args.mongo or args.mongo_file:
        raise StudyError(f"{args.config} has no [tune] table: --workers, --trials and --mongo are for tuning")
    if args.seeds is not None:
        study = dataclasses.replace(study, seeds=_seed_subset(study.seeds, args.seeds))
    return study


def _chosen(flag: str, text: str, known: list[str], config: str) -> list[str]:
    """``--methods a,b``: those names, which must be among the study file's ``known`` ones."""
    chosen = [name for name in text.split(",") if name]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise StudyError(f"{flag}: {unknown} not in {config} (it has {known})")
    return chosen


def _hinf_xor(args: argparse.Namespace) -> int:
    from study.hinf_xor import load_hinf_study, run_hinf_study, units

    try:
        study = load_hinf_study(args.config, out_dir=args.out)
        methods = _chosen("--methods", args.methods, [m.name for m in study.methods], args.config)
        depths = [int(d) for d in args.depths.split(",") if d]
    except ValueError as exc:  # StudyError, or --depths not integers
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{study.path}: {sum(1 for _ in units(study, methods, depths))} result files, valid")
        return 0
    return _run_to_the_end(lambda: print(f"study: report: {run_hinf_study(study, methods, depths, not args.report)}"))


def _saddle(args: argparse.Namespace) -> int:
    from study.saddle import load_saddle_study, run_saddle_study, runs

    try:
        study = load_saddle_study(args.config, out_dir=args.out)
        cases = _chosen("--cases", args.cases, [c.name for c in study.cases], args.config)
    except StudyError as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{study.path}: {sum(1 for _ in runs(study, cases))} runs, all configs valid")
        return 0
    return _run_to_the_end(lambda: print(f"study: report: {run_saddle_study(study, cases, not args.report)}"))


def _status(args: argparse.Namespace) -> int:
    from study.status import show_status

    try:
        study = load_study(args.config, out_dir=args.out)
        mongo = Path(args.mongo_file).read_text().strip() if args.mongo_file else args.mongo
        if mongo and study.tune is not None:
            study = dataclasses.replace(study, tune=dataclasses.replace(study.tune, mongo=mongo))
        show_status(study, args.watch)
    except (StudyError, OSError) as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _carry(args: argparse.Namespace) -> int:
    """``save`` and ``restore`` (:mod:`study.archive`)."""
    from study.archive import restore_study, save_study

    try:
        study = load_study(args.config, out_dir=args.out)
        if study.tune is None:
            raise StudyError(f"{args.config} has no [tune] table: only a tuned study has a database to save")
        if args.command == "save":
            manifest = save_study(study, Path(args.folder))
            counts = ", ".join(f"{n} {state}" for state, n in manifest["trials"].items() if n)
            print(f"study: saved trials ({counts or 'none'}; {manifest['requeued']} running saved as queued; "
                  f"the newest complete checkpoint of {len(manifest['checkpoints'])} begun trial(s) and of "
                  f"{len(manifest['run_checkpoints'])} unfinished run(s) outside the search) and "
                  f"{manifest['files']} files to {args.folder}")  # fmt: skip
        else:
            restore_study(study, Path(args.folder))
    except (StudyError, OSError) as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _report(args: argparse.Namespace) -> int:
    from study.runner import rewrite_report, write_interim_report

    try:
        (write_interim_report if args.interim else rewrite_report)(load_study(args.config, out_dir=args.out))
    except (StudyError, OSError) as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_to_the_end(run: Callable[[], object]) -> int:
    """Runs a study (a scheduler's SIGTERM unwinds it); the exit status: 0, 1 when a run failed, 130 when stopped."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run()
    except StudyError as exc:  # the study file was fine: a run, a driver or the server failed
        print(f"study: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("study: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "hinf-xor":
        return _hinf_xor(args)
    if args.command == "saddle":
        return _saddle(args)
    if args.command == "status":
        return _status(args)
    if args.command == "report":
        return _report(args)
    if args.command in ("save", "restore"):
        return _carry(args)
    try:
        study = _load(args)
        cells = check_cells(study)
    except (StudyError, OSError) as exc:
        print(f"study: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{study.path}: {len(cells)} cells, all configs valid: {', '.join(cells)}")
        return 0

    from study.runner import run_fisher_study, run_study

    return _run_to_the_end(lambda: (run_fisher_study if args.command == "fisher" else run_study)(study))


if __name__ == "__main__":
    raise SystemExit(main())
