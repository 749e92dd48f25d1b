"""MongoDB trial store, written directly on pymongo 4, in hyperopt's document schema.

Collections of the database (the URL's database, default ``hpo``):

- ``jobs``: one document per trial, as hyperopt's ``mongoexp`` writes them: ``tid``, ``state``
  (0 new, 1 running, 2 done, 3 error), ``spec``, ``result``, ``misc`` (``tid``, ``cmd``, ``workdir``, ``idxs``,
  ``vals``), ``exp_key``, ``owner``, ``version``, ``book_time``, ``refresh_time``; plus ``heartbeat`` (the
  owner's beat counter) and ``attempts``. ``spec`` is JSON (the overrides of the trial), never pickled code.
- ``hpo_experiments``: one document per experiment (``_id`` = exp_key): the space, the base config's text, ...,
  and the driver's lease (``lease_holder``, ``lease_expires``): one driver per experiment.
- ``hpo_counters``: the next tid of each experiment (a restarted driver never reuses a tid).

Every state change is one conditional ``update_one``/``find_one_and_update`` on the trial's ``_id`` and the
fields the caller last saw, so racing workers and drivers cannot both win.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import pymongo
import pymongo.errors
from pymongo import ReturnDocument, uri_parser

__all__ = ["FINISHED_STATES", "ExperimentMismatch", "StoreError", "TrialState", "TrialStore", "connect", "mask_url"]


class TrialState(enum.IntEnum):
    """A trial document's ``state``: hyperopt.base's JOB_STATE_* values, stored as these ints (hyperopt's tools read
    them), repeated so that the store does not import hyperopt (checked in the tests)."""

    NEW = 0
    RUNNING = 1
    DONE = 2
    ERROR = 3


FINISHED_STATES: Final = (TrialState.DONE, TrialState.ERROR)  # a trial in these never changes again

TRIALS = "jobs"
EXPERIMENTS = "hpo_experiments"
COUNTERS = "hpo_counters"


# A reservation takes the oldest still queued of the RESERVE_CANDIDATES oldest queued trials; when other workers took
# them all meanwhile, it reads the queue again, at most RESERVE_ROUNDS times.
RESERVE_CANDIDATES = 8
RESERVE_ROUNDS = 4


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


def connect(url: str, timeout_s: float = 5.0, database: str | None = None) -> TrialStore:
    """Connects and checks the connection (and the credentials) within about ``timeout_s`` seconds."""
    masked = mask_url(url)
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
    return TrialStore(client, name)


class TrialStore:
    def __init__(self, client: pymongo.MongoClient[dict[str, Any]], database: str = "hpo") -> None:
        self.client = client
        self.db = client[database]
        self.trials = self.db[TRIALS]
        self.experiments = self.db[EXPERIMENTS]
        self.counters = self.db[COUNTERS]

    def close(self) -> None:
        self.client.close()

    def ensure_indexes(self) -> None:
        self.trials.create_index([("exp_key", 1), ("tid", 1)], unique=True)
        self.trials.create_index([("state", 1), ("exp_key", 1)])
        self.trials.create_index([("state", 1)])  # nx-27017 uses only single-field indexes for a query on state

    # -- experiments -------------------------------------------------------------------------------------------

    def get_experiment(self, exp_key: str) -> dict[str, Any] | None:
        return self.experiments.find_one({"_id": exp_key})

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

    def update_experiment(self, exp_key: str, fields: Mapping[str, Any]) -> None:
        self.experiments.update_one({"_id": exp_key}, {"$set": dict(fields)})

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

    def renew_driver_lease(self, exp_key: str, holder: str, lease_s: float) -> bool:
        """False when another driver has taken the experiment over."""
        renewed = self.experiments.update_one(
            {"_id": exp_key, "lease_holder": holder}, {"$set": {"lease_expires": time.time() + lease_s}}
        )
        return renewed.matched_count == 1

    def release_driver_lease(self, exp_key: str, holder: str) -> None:
        self.experiments.update_one(
            {"_id": exp_key, "lease_holder": holder}, {"$set": {"lease_holder": None, "lease_expires": None}}
        )

    # -- trials ------------------------------------------------------------------------------------------------

    def new_tids(self, exp_key: str, n: int) -> list[int]:
        """``n`` tids never handed out before for this experiment (atomic counter)."""
        doc = self.counters.find_one_and_update(
            {"_id": exp_key}, {"$inc": {"next_tid": n}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        end = int(doc["next_tid"]) if doc else n
        return list(range(end - n, end))

    def insert_trials(self, docs: Sequence[Mapping[str, Any]]) -> None:
        if docs:
            self.trials.insert_many([dict(d) for d in docs])

    def trial_docs(self, exp_key: str, *, curves: bool = True) -> list[dict[str, Any]]:
        """The experiment's trials by tid; ``curves=False`` leaves out the learning curves (the driver's rounds)."""
        projection = None if curves else {"result.learning_curve": 0}
        return list(self.trials.find({"exp_key": exp_key}, projection).sort("tid", 1))

    def active_docs(self, exp_key: str) -> list[dict[str, Any]]:
        """The queued and running trials: few and small (no result yet), so a driver can read them every round."""
        query = {"exp_key": exp_key, "state": {"$in": [TrialState.NEW, TrialState.RUNNING]}}
        return list(self.trials.find(query))

    def running_docs(self, exp_key: str | None = None) -> list[dict[str, Any]]:
        """The running trials (of one experiment, or of all): what a stale-heartbeat check reads."""
        query: dict[str, Any] = {"state": TrialState.RUNNING}
        if exp_key is not None:
            query["exp_key"] = exp_key
        return list(self.trials.find(query))

    def docs_by_tid(self, exp_key: str, tids: Sequence[int]) -> list[dict[str, Any]]:
        """The trials with these tids (in any state)."""
        return list(self.trials.find({"exp_key": exp_key, "tid": {"$in": list(tids)}}))

    def count_states(self, exp_key: str) -> dict[TrialState, int]:
        """How many of the experiment's trials are in each state (every state present, 0 when none)."""
        counts = dict.fromkeys(TrialState, 0)
        for doc in self.trials.find({"exp_key": exp_key}, {"state": 1}):
            counts[TrialState(int(doc["state"]))] += 1
        return counts

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
                    "$set": {"state": TrialState.RUNNING, "owner": owner, "book_time": now, "refresh_time": now},
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
        """Heartbeat; False when the trial is no longer this owner's (it was requeued)."""
        result = self.trials.update_one(
            self._mine(doc, owner), {"$set": {"refresh_time": utcnow()}, "$inc": {"heartbeat": 1}}
        )
        return result.matched_count == 1

    def finish(
        self, doc: Mapping[str, Any], owner: str, result: Mapping[str, Any], *, error: tuple[str, str] | None = None
    ) -> bool:
        """Stores the result (state done, or error when ``error`` is given). False when no longer the owner's."""
        fields: dict[str, Any] = {
            "state": TrialState.ERROR if error else TrialState.DONE,
            "result": dict(result),
            "refresh_time": utcnow(),
        }
        if error:
            fields["misc.error"] = list(error)
        if result.get("out_dir"):
            fields["misc.workdir"] = str(result["out_dir"])
        updated = self.trials.update_one(self._mine(doc, owner), {"$set": fields, "$inc": {"version": 1}})
        return updated.matched_count == 1

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
