"""Where torch.distributed's ranks meet: found through MPI when MPI started them, else read from the environment.

Under an MPI launcher (Open MPI's mpirun, ``srun --mpi=pmix``, MPICH or Intel MPI) with mpi4py importable, rank 0
opens a listening socket on a port the kernel picks, and MPI broadcasts rank 0's address and that port to the other
ranks. Rank 0's TCPStore then takes over that very socket, so nothing else can take the port in between: two launches
on one host never collide, with or without a scheduler, and a hostfile run needs no MASTER_ADDR. ``MASTER_ADDR`` and
``MASTER_PORT``, when set, still win (each on its own; the port is then bound by rank 0 as well).

Rank 0's address: 127.0.0.1 when every rank runs on rank 0's host (same host name); else the first address of rank 0's
host name that is not a loopback one; else the address of the interface by which rank 0 reaches another rank's host;
else an error asking for MASTER_ADDR.

Without an MPI launcher or without mpi4py, or with ``LAUNCH_RENDEZVOUS=environment`` (for an image whose MPI cannot
talk to the host's launcher: importing mpi4py initialises MPI), the ranks meet where ``launch.environment`` says
(MASTER_ADDR, the node list, a port derived from the job id).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from launch.environment import Environment, LaunchError

MPI_LAUNCHERS = ("openmpi", "pmix", "pmi")
_BACKLOG = 4096  # every rank connects to rank 0's store at once


@dataclass(frozen=True)
class Meeting:
    host: str
    port: int
    how: str  # mpi | environment
    listen_fd: int | None = None  # rank 0's listening socket, handed to its TCPStore (MPI rendezvous only)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def rank0_address(
    hosts: Sequence[str],
    resolve: Callable[[str], list[str]] | None = None,
    route_to: Callable[[str], str] | None = None,
) -> str:
    """The address other ranks reach rank 0 at; ``hosts[r]`` is rank r's host name (resolvers injectable for tests)."""
    resolve = resolve or _addresses_of
    route_to = route_to or _source_address_towards
    if all(host == hosts[0] for host in hosts):
        return "127.0.0.1"
    own = [address for address in resolve(hosts[0]) if not _is_loopback(address)]
    if own:
        return own[0]
    for other in (host for host in hosts if host != hosts[0]):
        try:
            return route_to(other)
        except OSError:
            continue
    raise LaunchError(
        f"launch: rank 0's host name {hosts[0]!r} resolves only to loopback addresses and no other rank's host "
        "can be reached from it: set MASTER_ADDR to an address of rank 0's host that the other nodes reach"
    )


def _addresses_of(host: str) -> list[str]:
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except OSError:
        return []


def _source_address_towards(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (a UDP connect sends nothing)."""
    target = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(target[0], socket.SOCK_DGRAM) as probe:
        probe.connect(target[4])
        return str(probe.getsockname()[0])


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server(("", port), family=family, backlog=_BACKLOG)


def _rank0_offer(environ: Mapping[str, str], hosts: Sequence[str]) -> tuple[str, int, socket.socket]:
    host = environ.get("MASTER_ADDR") or rank0_address(hosts)
    listener = _listen(host, int(environ.get("MASTER_PORT", "0")))
    return host, int(listener.getsockname()[1]), listener


def through_mpi(env: Environment, environ: Mapping[str, str]) -> Meeting | None:
    """The meeting point broadcast by rank 0 through MPI, or None when MPI did not start us or mpi4py is missing."""
    choice = environ.get("LAUNCH_RENDEZVOUS", "auto")
    if choice not in ("auto", "environment"):
        raise LaunchError(f"launch: LAUNCH_RENDEZVOUS must be auto or environment, got {choice!r}")
    if choice == "environment" or env.launcher not in MPI_LAUNCHERS:
        return None
    if "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    world: Any = MPI.COMM_WORLD
    if (world.Get_rank(), world.Get_size()) != (env.rank, env.world_size):
        raise LaunchError(
            f"launch: MPI says rank {world.Get_rank()} of {world.Get_size()} but the {env.launcher} launcher's "
            f"variables say rank {env.rank} of {env.world_size}: was this process started by another MPI library?"
        )
    hosts = world.allgather(socket.gethostname())
    offer: tuple[str, int, str] = ("", 0, "")
    listener = None
    if env.rank == 0:
        try:
            host, port, listener = _rank0_offer(environ, hosts)
            offer = (host, port, "")
        except (OSError, LaunchError, ValueError) as error:
            offer = ("", 0, str(error))
    host, port, problem = world.bcast(offer, root=0)
    if problem:
        raise LaunchError(f"launch: rank 0 could not open the rendezvous: {problem}")
    return Meeting(host, port, "mpi", listener.detach() if listener is not None else None)


def meeting_point(env: Environment, environ: Mapping[str, str]) -> Meeting:
    """Where this run's ranks meet: through MPI if it can, else from the environment (see the module's text)."""
    meeting = through_mpi(env, environ)
    if meeting is not None:
        return meeting
    if not env.master_addr:
        raise LaunchError(
            "launch: the ranks span several nodes but nothing names the master: install mpi4py (scripts/setup.sh) "
            "so that rank 0's address travels through MPI, or set MASTER_ADDR to rank 0's host (with Open MPI: "
            "mpirun -x MASTER_ADDR=$(hostname) ...)"
        )
    return Meeting(env.master_addr, env.master_port, "environment")
