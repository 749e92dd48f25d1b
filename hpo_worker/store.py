"""MongoDB trial store, written directly on pymongo 4, in hyperopt's document schema.

Collections of the database (the URL's database, default ``hpo``):

- ``jobs``: one document per trial, as hyperopt's ``mongoexp`` writes them: ``tid``, ``state`` (0 new, 1 running,
  2 done, 3 error, 5 pruned), ``spec``, ``result``, ``misc`` (``tid``, ``cmd``, ``workdir``, ``idxs``, ``vals``),
  ``exp_key``, ``owner``, ``version``, ``book_time``, ``refresh_time``; plus ``heartbeat`` (the owner's beat
  counter), ``attempts`` and ``intermediate`` (the current attempt's learning curve for pruning,
  ``[{step, fraction, value}]``: :mod:`hpo_worker.pruning`). ``spec`` is JSON (the overrides of the trial), never
  pickled code. A pruned trial is in state 5, which hyperopt does not have (its tools leave such trials out).
- ``hpo_experiments``: one document per experiment (``_id`` = exp_key): the space, the base config's text, ...,
  and the driver's lease (``lease_holder``, ``lease_expires``): one driver per experiment.
- ``hpo_counters``: the next tid of each experiment (a restarted driver never reuses a tid).

Every state change is one conditional ``update_one``/``find_one_and_update`` on the trial's ``_id`` and the
fields the caller last saw, so racing workers and drivers cannot both win.

A restart or failover of the database is waited out: every operation is retried with backoff for up to
``patience_s`` seconds (:class:`Reconnect`), then :class:`StoreUnreachable` is raised (the command line exits with
:data:`EXIT_STORE_UNREACHABLE`). A write whose reply was lost may have been applied; each retried write is
idempotent or checks first whether it already was (:func:`_retrying_with`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import functools
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import pymongo
import pymongo.errors
from pymongo import ReturnDocument, uri_parser

__all__ = [
    "COUNTERS", "DEFAULT_PATIENCE_S", "ENV_PATIENCE", "EXIT_STORE_UNREACHABLE", "EXPERIMENTS", "FINISHED_STATES",
    "TRIALS", "ExperimentMismatch",
    "Reconnect", "StoreError", "StoreUnreachable", "TrialState", "TrialStore", "connect", "mask_url", "state_counts",
]  # fmt: skip


class TrialState(enum.IntEnum):
    """A trial document's ``state``: hyperopt.base's JOB_STATE_* values, stored as these ints (hyperopt's tools read
    them), repeated so that the store does not import hyperopt (checked in the tests), and PRUNED, our own (hyperopt's
    4 is its CANCEL)."""

    NEW = 0
    RUNNING = 1
    DONE = 2
    ERROR = 3
    PRUNED = 5  # stopped by the experiment's pruner; its result holds its last intermediate value


FINISHED_STATES: Final = (TrialState.DONE, TrialState.ERROR, TrialState.PRUNED)  # these never change again


_STATE_FIELDS: Final = {"exp_key": 1, "tid": 1, "state": 1, "result.status": 1}


def _state_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's ``_id``, ``exp_key``, ``tid``, ``state`` and ``status`` from a document read with _STATE_FIELDS.
    MongoDB nests a projected ``result.status``; nx-27017 returns it under that dotted key."""
    status = doc.get("result.status", doc.get("result", {}).get("status"))
    return {"_id": doc["_id"], "exp_key": doc["exp_key"], "tid": doc["tid"], "state": doc["state"], "status": status}


def state_counts(docs: Iterable[Mapping[str, Any]]) -> dict[TrialState, int]:
    """How many of ``docs`` are in each state (every state present, 0 when none)."""
    counts = dict.fromkeys(TrialState, 0)
    for doc in docs:
        counts[TrialState(int(doc["state"]))] += 1
    return counts


TRIALS = "jobs"
EXPERIMENTS = "hpo_experiments"
COUNTERS = "hpo_counters"


# A reservation takes the oldest still queued of the RESERVE_CANDIDATES oldest queued trials; when other workers took
# them all meanwhile, it reads the queue again, at most RESERVE_ROUNDS times.
RESERVE_CANDIDATES = 8
RESERVE_ROUNDS = 4

# How long an operation waits for the database to come back (a restart, a replica set's election) before the
# process gives up with EXIT_STORE_UNREACHABLE; --db-patience, or this environment variable, sets it.
DEFAULT_PATIENCE_S = 60.0
ENV_PATIENCE = "HPO_DB_PATIENCE"
EXIT_STORE_UNREACHABLE = 4  # exit status of every hpo_worker process that lost the database for longer than that
# Server errors that mean "not now" (a primary stepping down, a server shutting down), besides lost connections.
TRANSIENT_CODES = frozenset({6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
ATTEMPT_MIN_S = 1.0  # the least time one attempt gets, even when the patience is nearly used up
# An attempt that fails this long after its deadline was not waiting on the database: its process was suspended.
SUSPENDED_AFTER_S = 2.0


class StoreError(RuntimeError):
    """MongoDB cannot be used (unreachable, authentication failed, ...); the message says what to do."""


class ExperimentMismatch(StoreError):
    """The experiment exists with other settings (``different`` names them): resuming it would mix two searches."""

    def __init__(self, exp_key: str, different: Sequence[str]) -> None:
        self.exp_key, self.different = exp_key, tuple(different)
        super().__init__(
            f"experiment {exp_key!r} already exists with another {', '.join(different)}: choose another --exp "
            "name, or pass the same settings to resume it"
        )


class StoreUnreachable(StoreError):
    """The database did not answer for longer than the patience: ``address`` is ``host:port`` (never a password)."""

    def __init__(self, address: str, waited_s: float, cause: BaseException) -> None:
        self.address, self.waited_s = address, waited_s
        super().__init__(
            f"MongoDB at {address} unreachable for {waited_s:.0f} s ({type(cause).__name__}): check that the server "
            f"runs and this host reaches it; finished trials keep their result in their folder (result.json) and are "
            f"stored, not trained again, by the next worker (--db-patience or ${ENV_PATIENCE} sets the wait)"
        )


_MONGO_URL = re.compile(r"mongodb(?:\+srv)?://\S+")  # in free text a URL ends at white space (valid ones have none)


def mask_url(text: str) -> str:
    """``text`` with the password of every MongoDB URL in it replaced by ``***`` (safe to print or store).

    Where pymongo's own parser accepts the URL, the password is exactly what the parser takes for it (percent-encoded
    ``/``, ``@``, ``:``; several hosts; options with an ``@``; ``mongodb+srv``). A URL the parser refuses (a raw ``/``,
    ``@`` or ``:`` in the password) is masked from the user's ``:`` to the URL's last ``@``: more than the password,
    never less. Masking a masked text changes nothing.
    """
    return _MONGO_URL.sub(lambda match: _mask_one(match.group()), text)


def _mask_one(url: str) -> str:
    scheme, rest = url.split("://", 1)
    try:  # mongodb+srv's user info parses as mongodb's; parsing it as such avoids the DNS look-up of its hosts
        parsed: dict[str, Any] | None = uri_parser.parse_uri("mongodb://" + rest, validate=False)
    except Exception:  # whatever the parser refuses, the conservative mask below applies
        parsed = None
    if parsed is not None:
        if parsed["password"] is None:
            return url
        # Where the parser splits the user info from the hosts: the last "@" before the path and the options.
        userinfo_end = rest.partition("?")[0].partition("/")[0].rindex("@")
    else:
        userinfo_end = rest.rfind("@")
    user_end = rest.find(":", 0, max(userinfo_end, 0))
    if user_end < 0:  # no user info, or a user without a password
        return url
    return f"{scheme}://{rest[:user_end]}:***{rest[userinfo_end:]}"


def utcnow() -> dt.datetime:
    """Milliseconds precision, as BSON stores it (hyperopt's ``coarse_utcnow``)."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def patience_from_env(default: float = DEFAULT_PATIENCE_S) -> float:
    """``$HPO_DB_PATIENCE`` in seconds, else ``default``; a value that is not a positive number is an error."""
    text = os.environ.get(ENV_PATIENCE)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise StoreError(f"${ENV_PATIENCE}={text!r}: give the seconds to wait for MongoDB, a positive number")
    return value


def server_address(url: str) -> str:
    """``host:port[,host:port...]`` of the URL (no user, no password), for messages."""
    try:
        nodes = pymongo.uri_parser.parse_uri(url)["nodelist"]
    except (pymongo.errors.PyMongoError, ValueError):
        return mask_url(url)
    return ",".join(f"{host}:{port}" for host, port in nodes)


def connect(
    url: str, timeout_s: float = 5.0, database: str | None = None, patience_s: float | None = None
) -> TrialStore:
    """Connects and checks the connection (and the credentials) within about ``timeout_s`` seconds; later
    operations wait up to ``patience_s`` (default: $HPO_DB_PATIENCE, else 60 s) for a database that went away."""
    masked = mask_url(url)
    patience = patience_from_env() if patience_s is None else patience_s
    ms = max(1, int(timeout_s * 1000))
    try:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=max(ms, 30000), appname="hpo_worker"
        )
    except (pymongo.errors.ConfigurationError, pymongo.errors.InvalidURI, ValueError) as exc:
        raise StoreError(f"invalid MongoDB URL {masked}: {exc}") from exc
    try:
        client.admin.command("ping")
    except pymongo.errors.ServerSelectionTimeoutError as exc:
        client.close()
        raise StoreError(
            f"cannot reach MongoDB at {masked} within {timeout_s:g} s: check host, port, firewall and TLS options "
            "(or omit --mongo to use the embedded server)"
        ) from exc
    except pymongo.errors.OperationFailure as exc:
        client.close()
        if exc.code in (18, 13) or "auth" in str(exc).lower():
            raise StoreError(
                f"MongoDB at {masked} refused the credentials (authentication failed): check the user, the password "
                "and authSource in the URL"
            ) from exc
        raise StoreError(f"MongoDB at {masked} refused the connection check: {exc}") from exc
    except (pymongo.errors.PyMongoError, KeyError, ValueError) as exc:
        client.close()
        has_user = "@" in url.split("//", 1)[-1].split("/", 1)[0]
        what = "authentication failed" if has_user else "the server's reply was not understood"
        raise StoreError(f"MongoDB at {masked}: {what} ({type(exc).__name__}: {exc})") from exc
    name = database or client.get_default_database(default="hpo").name
    return TrialStore(client, name, Reconnect(server_address(url), patience))


def is_transient(exc: pymongo.errors.PyMongoError) -> bool:
    """A lost connection, a server that cannot be selected, or a server error that says "not now"."""
    if isinstance(exc, pymongo.errors.ConnectionFailure):  # AutoReconnect, NetworkTimeout, ServerSelectionTimeout...
        return True
    if exc.timeout:  # the attempt's share of the patience ran out (pymongo.timeout)
        return True
    if isinstance(exc, pymongo.errors.OperationFailure):
        return exc.code in TRANSIENT_CODES or exc.has_error_label("RetryableWriteError")
    return False


T = TypeVar("T")
P = ParamSpec("P")


@dataclass
class Reconnect:
    """Runs a store operation again, with backoff, while the database is away, for up to ``patience_s``."""

    address: str  # host:port, for the message
    patience_s: float = DEFAULT_PATIENCE_S
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @contextlib.contextmanager
    def limited(self, seconds: float) -> Iterator[None]:
        """Within the block, the patience is at most ``seconds``."""
        saved = self.patience_s
        self.patience_s = min(saved, seconds)
        try:
            yield
        finally:
            self.patience_s = saved

    def run(self, operation: Callable[[], T], recover: Callable[[], T | None] | None = None) -> T:
        """``operation()``; after a transient failure, ``recover()`` first (a non-None value says the lost attempt
        was applied, and is the answer) and then ``operation()`` again."""
        started = time.monotonic()
        delay = BACKOFF_FIRST_S
        failed = False
        while True:
            # Each attempt gets what is left of the patience (pymongo's own server selection would wait its
            # serverSelectionTimeoutMS, whatever the patience).
            left = max(self.patience_s - (time.monotonic() - started), ATTEMPT_MIN_S)
            attempt_started = time.monotonic()
            try:
                with pymongo.timeout(left):
                    if failed and recover is not None and (done := recover()) is not None:
                        return done
                    return operation()
            except pymongo.errors.PyMongoError as exc:
                if not is_transient(exc):
                    raise
                if time.monotonic() - attempt_started > left + SUSPENDED_AFTER_S:
                    # Ended long after its deadline: this process was suspended (SIGSTOP, as when a study is paused
                    # with its server; a host's sleep), not waiting on the database. The patience starts again.
                    started = time.monotonic()
                waited = time.monotonic() - started
                if waited >= self.patience_s:
                    raise StoreUnreachable(self.address, self.patience_s, exc) from exc  # (the last try ran over)
                failed = True
                self.sleep(min(delay, self.patience_s - waited))
                delay = min(delay * 2, BACKOFF_MAX_S)


Method = Callable[Concatenate["TrialStore", P], T]


def _wrap(method: Method[P, T], recover: Method[P, Any] | None) -> Method[P, T]:
    @functools.wraps(method)
    def retried(self: TrialStore, *args: P.args, **kwargs: P.kwargs) -> T:
        again = None if recover is None else functools.partial(recover, self, *args, **kwargs)
        return self.reconnect.run(functools.partial(method, self, *args, **kwargs), again)

    return retried


def _retrying(method: Method[P, T]) -> Method[P, T]:
    """Makes a :class:`TrialStore` method wait out a database restart (``self.reconnect``): for reads and for writes
    that are idempotent."""
    return _wrap(method, None)


def _retrying_with(recover: Method[P, Any]) -> Callable[[Method[P, T]], Method[P, T]]:
    """:func:`_retrying` for a write that must not be applied twice: ``recover`` (same arguments) tells whether an
    attempt whose reply was lost was applied."""
    return lambda method: _wrap(method, recover)


class TrialStore:
    def __init__(
        self, client: pymongo.MongoClient[dict[str, Any]], database: str = "hpo", reconnect: Reconnect | None = None
    ) -> None:
        self.client = client
        self.reconnect = reconnect or Reconnect("MongoDB")
        self.db = client[database]
        self.trials = self.db[TRIALS]
        self.experiments = self.db[EXPERIMENTS]
        self.counters = self.db[COUNTERS]

    def close(self) -> None:
        self.client.close()

    @_retrying
    def ensure_indexes(self) -> None:
        self.trials.create_index([("exp_key", 1), ("tid", 1)], unique=True)
        self.trials.create_index([("state", 1), ("exp_key", 1)])
        self.trials.create_index([("state", 1)])  # nx-27017 uses only single-field indexes for a query on state

    # -- experiments -------------------------------------------------------------------------------------------

    @_retrying
    def get_experiment(self, exp_key: str) -> dict[str, Any] | None:
        return self.experiments.find_one({"_id": exp_key})

    @_retrying
    def create_or_check_experiment(self, exp_key: str, meta: Mapping[str, Any], compare: Sequence[str]) -> bool:
        """Stores the experiment; for an existing one, checks that ``compare`` keys agree. True when created.

        A key the stored experiment lacks (made by an older version) is not compared."""
        try:
            self.experiments.insert_one({"_id": exp_key, **meta, "created": utcnow()})
            return True
        except pymongo.errors.DuplicateKeyError:
            pass
        self.check_experiment(exp_key, meta, compare)
        return False

    def check_experiment(self, exp_key: str, meta: Mapping[str, Any], compare: Sequence[str]) -> bool:
        """Raises :class:`ExperimentMismatch` when a stored ``exp_key`` has other ``compare`` values than ``meta``;
        True when it is stored (and agrees), False when there is none. A key the stored experiment lacks (made by
        an older version) is not compared."""
        existing = self.get_experiment(exp_key)
        if existing is None:
            return False
        different = [key for key in compare if key in existing and existing[key] != meta.get(key)]
        if different:
            raise ExperimentMismatch(exp_key, different)
        return True

    @_retrying
    def update_experiment(self, exp_key: str, fields: Mapping[str, Any]) -> None:
        self.experiments.update_one({"_id": exp_key}, {"$set": dict(fields)})

    @_retrying
    def acquire_driver_lease(self, exp_key: str, holder: str, lease_s: float, holder_is_dead: bool = False) -> None:
        """Makes ``holder`` the experiment's only driver, or raises StoreError naming the live one.

        The lease (``lease_holder``, ``lease_expires`` in epoch seconds) is taken with a compare-and-swap on the
        values just read, so two drivers starting together cannot both win. ``holder_is_dead``: the caller checked
        that the current holder's process is gone (same host), so its lease need not run out first.
        """
        doc = self.get_experiment(exp_key) or {}
        current, expires = doc.get("lease_holder"), doc.get("lease_expires")
        now = time.time()
        if current not in (None, holder) and not holder_is_dead and float(expires or 0) > now:
            raise StoreError(
                f"experiment {exp_key!r} already has a driver ({current}, lease valid for another "
                f"{float(expires or 0) - now:.0f} s): run one driver per experiment; if that driver is dead, "
                "start this one again after its lease runs out"
            )
        taken = self.experiments.update_one(
            {"_id": exp_key, "lease_holder": current, "lease_expires": expires},
            {"$set": {"lease_holder": holder, "lease_expires": now + lease_s}},
        )
        if taken.matched_count != 1:
            raise StoreError(f"another driver took experiment {exp_key!r} at the same moment: run one driver")

    def lease_holder(self, exp_key: str) -> str | None:
        holder = (self.get_experiment(exp_key) or {}).get("lease_holder")
        return str(holder) if holder else None

    @_retrying
    def renew_driver_lease(self, exp_key: str, holder: str, lease_s: float) -> bool:
        """False when another driver has taken the experiment over."""
        renewed = self.experiments.update_one(
            {"_id": exp_key, "lease_holder": holder}, {"$set": {"lease_expires": time.time() + lease_s}}
        )
        return renewed.matched_count == 1

    @_retrying
    def release_driver_lease(self, exp_key: str, holder: str) -> None:
        self.experiments.update_one(
            {"_id": exp_key, "lease_holder": holder}, {"$set": {"lease_holder": None, "lease_expires": None}}
        )

    # -- every document of some experiments, to carry them to another database ---------------------------------

    @_retrying
    def experiment_documents(self, exp_keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Every document of these experiments, by collection (experiments, counters, trials), in a fixed order."""
        keys = list(exp_keys)
        return {
            EXPERIMENTS: list(self.experiments.find({"_id": {"$in": keys}}).sort("_id", 1)),
            COUNTERS: list(self.counters.find({"_id": {"$in": keys}}).sort("_id", 1)),
            TRIALS: list(self.trials.find({"exp_key": {"$in": keys}}).sort([("exp_key", 1), ("tid", 1)])),
        }

    def insert_documents(self, documents: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Inserts documents of :meth:`experiment_documents` (the experiments first, the trials last); a retry after
        a lost reply finds some already there, which is not an error."""
        for collection in (EXPERIMENTS, COUNTERS, TRIALS):
            if documents.get(collection):
                self._insert_new(collection, documents[collection])

    @_retrying
    def _insert_new(self, collection: str, docs: Sequence[Mapping[str, Any]]) -> None:
        try:
            target = {TRIALS: self.trials, EXPERIMENTS: self.experiments, COUNTERS: self.counters}[collection]
            target.insert_many([dict(d) for d in docs], ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
                raise

    # -- trials ------------------------------------------------------------------------------------------------

    @_retrying
    def new_tids(self, exp_key: str, n: int) -> list[int]:
        """``n`` tids never handed out before for this experiment (atomic counter)."""
        doc = self.counters.find_one_and_update(
            {"_id": exp_key}, {"$inc": {"next_tid": n}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        end = int(doc["next_tid"]) if doc else n
        return list(range(end - n, end))

    def insert_trials(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Inserts new trials; a retry after a lost reply finds some already there (their tids are this caller's own,
        from :meth:`new_tids`), which is not an error."""
        if docs:
            self._insert_new(TRIALS, docs)

    @_retrying
    def trial_docs(self, exp_key: str, *, curves: bool = True) -> list[dict[str, Any]]:
        """The experiment's trials by tid; ``curves=False`` leaves out the learning curves (the driver's rounds)."""
        projection = None if curves else {"result.learning_curve": 0}
        return list(self.trials.find({"exp_key": exp_key}, projection).sort("tid", 1))

    @_retrying
    def active_docs(self, exp_key: str) -> list[dict[str, Any]]:
        """The queued and running trials: few and small (no result yet), so a driver can read them every round."""
        query = {"exp_key": exp_key, "state": {"$in": [TrialState.NEW, TrialState.RUNNING]}}
        return list(self.trials.find(query))

    @_retrying
    def running_docs(self, exp_key: str | None = None) -> list[dict[str, Any]]:
        """The running trials (of one experiment, or of all): what a stale-heartbeat check reads."""
        query: dict[str, Any] = {"state": TrialState.RUNNING}
        if exp_key is not None:
            query["exp_key"] = exp_key
        return list(self.trials.find(query))

    @_retrying
    def docs_by_tid(self, exp_key: str, tids: Sequence[int]) -> list[dict[str, Any]]:
        """The trials with these tids (in any state)."""
        return list(self.trials.find({"exp_key": exp_key, "tid": {"$in": list(tids)}}))

    @_retrying
    def count_states(self, exp_key: str) -> dict[TrialState, int]:
        """How many of the experiment's trials are in each state (every state present, 0 when none)."""
        return state_counts(self.trials.find({"exp_key": exp_key}, {"state": 1}))

    @_retrying
    def trial_states(self, exp_keys: Sequence[str], after_tid: int = -1) -> list[dict[str, Any]]:
        """The trials of these experiments whose tid is larger than ``after_tid`` (all by default), in one query,
        as ``_id``, ``exp_key``, ``tid``, ``state`` and ``status`` (its result's, None before one): what a study's
        progress line counts (:class:`hpo_worker.status.StateReader`)."""
        # One experiment by equality: nx-27017 answers exp_key and tid from its index then, not with $in.
        keys: Any = exp_keys[0] if len(exp_keys) == 1 else {"$in": list(exp_keys)}
        query = {"exp_key": keys, "tid": {"$gt": after_tid}}
        return [_state_of(d) for d in self.trials.find(query, _STATE_FIELDS)]

    @_retrying
    def trial_states_of(self, ids: Sequence[Any]) -> list[dict[str, Any]]:
        """The trials with these ``_id`` values, as :meth:`trial_states` gives them."""
        return [_state_of(d) for d in self.trials.find({"_id": {"$in": list(ids)}}, _STATE_FIELDS)]

    def _reserved_already(self, owner: str, exp_key: str | None = None) -> dict[str, Any] | None:
        """The trial a reservation whose reply was lost gave ``owner`` (unique to its process, one trial at a time)."""
        query: dict[str, Any] = {"state": TrialState.RUNNING, "owner": owner}
        if exp_key is not None:
            query["exp_key"] = exp_key
        return self.trials.find_one(query)

    @_retrying_with(_reserved_already)
    def reserve(self, owner: str, exp_key: str | None = None) -> dict[str, Any] | None:
        """Atomically moves the oldest queued trial to running, owned by ``owner``; None when none is queued.

        Two steps, each indexed on any server: read the ids of the few oldest queued trials, then take the oldest of
        them still queued in one ``find_one_and_update`` (the server settles races between workers). One sorted
        ``find_one_and_update`` on ``state`` alone would do, but nx-27017 scans the whole collection for it: 10 ms
        a reservation at 1,200 stored trials, paid by every idle worker's every poll.
        """
        query: dict[str, Any] = {"state": TrialState.NEW}
        if exp_key is not None:
            query["exp_key"] = exp_key
        for _ in range(RESERVE_ROUNDS):
            ids = [c["_id"] for c in self.trials.find(query, {"_id": 1}).sort("tid", 1).limit(RESERVE_CANDIDATES)]
            if not ids:
                return None
            now = utcnow()
            doc = self.trials.find_one_and_update(
                {"_id": {"$in": ids}, "state": TrialState.NEW},
                {
                    "$set": {
                        "state": TrialState.RUNNING,
                        "owner": owner,
                        "book_time": now,
                        "refresh_time": now,
                        "intermediate": [],  # a new attempt's curve starts empty
                    },
                    "$inc": {"version": 1, "heartbeat": 1, "attempts": 1},
                },
                sort=[("tid", 1)],
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return doc
        return None  # other workers took every candidate, RESERVE_ROUNDS times: the next poll tries again

    def _mine(self, doc: Mapping[str, Any], owner: str) -> dict[str, Any]:
        return {"_id": doc["_id"], "state": TrialState.RUNNING, "owner": owner, "version": doc["version"]}

    def beat(self, doc: Mapping[str, Any], owner: str) -> bool:
        """Heartbeat; False when the trial is no longer this owner's (it was requeued). Not retried: the next beat
        is the retry, and a beat that waited for the database would hold up the end of the trial."""
        result = self.trials.update_one(
            self._mine(doc, owner), {"$set": {"refresh_time": utcnow()}, "$inc": {"heartbeat": 1}}
        )
        return result.matched_count == 1

    @_retrying
    def report_curve(self, doc: Mapping[str, Any], owner: str, curve: Sequence[Mapping[str, Any]]) -> bool:
        """Stores the running trial's whole curve so far (idempotent); False when it is no longer this owner's."""
        result = self.trials.update_one(self._mine(doc, owner), {"$set": {"intermediate": [dict(r) for r in curve]}})
        return result.matched_count == 1

    @_retrying
    def curves(self, exp_key: str, tids: Sequence[int] = (), after_tid: int = -1) -> list[dict[str, Any]]:
        """``tid``, ``state``, ``intermediate`` and ``status`` (the result's) of the trials ``tids`` and of those
        whose tid is larger than ``after_tid``, in any state: what a pruner compares. All of them by default; a
        reader that keeps the finished trials' curves (which never change again) asks only for the others and the
        newer ones, which the database finds by its index without reading the rest (nx-27017 decodes every
        document it returns: the whole experiment's curves at each evaluation kept it busy)."""
        fields = {"tid": 1, "state": 1, "intermediate": 1, "result.status": 1}
        docs = list(self.trials.find({"exp_key": exp_key, "tid": {"$gt": after_tid}}, fields))
        if tids:
            docs += self.trials.find({"exp_key": exp_key, "tid": {"$in": [int(t) for t in tids]}}, fields)
        for doc in docs:  # MongoDB nests a dotted projection; nx-27017 answers with the flat key "result.status"
            doc["status"] = (doc.get("result") or {}).get("status", doc.get("result.status"))
        return docs

    def _changed_by(self, doc: Mapping[str, Any], owner: str | None, states: Sequence[TrialState]) -> bool | None:
        """True when the trial is in ``states`` one version after ``doc``, owned by ``owner``: a write of this caller
        whose reply was lost; None otherwise (write again)."""
        query = {"_id": doc["_id"], "owner": owner, "version": doc["version"] + 1, "state": {"$in": list(states)}}
        return True if self.trials.find_one(query, {"_id": 1}) is not None else None

    def _finished_already(self, doc: Mapping[str, Any], owner: str, *args: Any, **kwargs: Any) -> bool | None:
        return self._changed_by(doc, owner, FINISHED_STATES)

    def _released_already(self, doc: Mapping[str, Any], owner: str) -> bool | None:
        return self._changed_by(doc, None, [TrialState.NEW])

    @_retrying_with(_finished_already)
    def finish(
        self, doc: Mapping[str, Any], owner: str, result: Mapping[str, Any], *, error: tuple[str, str] | None = None
    ) -> bool:
        """Stores the result (state done, pruned when its status is "pruned", or error when ``error`` is given);
        its ``intermediate`` values become the trial's curve. False when no longer the owner's."""
        state = TrialState.PRUNED if result.get("status") == "pruned" else TrialState.DONE
        fields: dict[str, Any] = {
            "state": TrialState.ERROR if error else state,
            "result": {k: v for k, v in result.items() if k != "intermediate"},
            "refresh_time": utcnow(),
        }
        if "intermediate" in result:
            fields["intermediate"] = list(result["intermediate"])
        if error:
            fields["misc.error"] = list(error)
        if result.get("out_dir"):
            fields["misc.workdir"] = str(result["out_dir"])
        updated = self.trials.update_one(self._mine(doc, owner), {"$set": fields, "$inc": {"version": 1}})
        return updated.matched_count == 1

    @_retrying_with(_released_already)
    def release(self, doc: Mapping[str, Any], owner: str) -> bool:
        """Puts a running trial back in the queue (SIGTERM); it does not count as a failed attempt."""
        updated = self.trials.update_one(
            self._mine(doc, owner),
            {
                "$set": {"state": TrialState.NEW, "owner": None, "book_time": None, "refresh_time": None},
                "$inc": {"version": 1, "attempts": -1},
            },
        )
        return updated.matched_count == 1

    @_retrying
    def requeue_if_unchanged(self, doc: Mapping[str, Any], *, max_retries: int, reason: str) -> str | None:
        """Requeues (or, after ``max_retries`` failed attempts, fails) a running trial whose heartbeat has not moved
        since ``doc`` was read. Returns "requeued", "error" or None (it changed meanwhile)."""
        query = {
            "_id": doc["_id"],
            "state": TrialState.RUNNING,
            "owner": doc.get("owner"),
            "version": doc.get("version"),
            "heartbeat": doc.get("heartbeat"),
        }
        attempts = int(doc.get("attempts", 1))
        if attempts > max_retries:
            message = f"{reason}; gave up after {attempts} attempts (--max-retries {max_retries})"
            fields: dict[str, Any] = {
                "state": TrialState.ERROR,
                "result": {"status": "fail", "failure": message},
                "misc.error": ["WorkerLost", message],
                "refresh_time": utcnow(),
            }
            outcome = "error"
        else:
            fields = {"state": TrialState.NEW, "owner": None, "book_time": None, "refresh_time": None}
            outcome = "requeued"
        updated = self.trials.update_one(
            query, {"$set": fields, "$inc": {"version": 1}, "$push": {"misc.lost_owners": doc.get("owner")}}
        )
        return outcome if updated.matched_count == 1 else None
