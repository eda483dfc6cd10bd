"""A job whose processes all run on this machine keeps torch.distributed's rendezvous, and gloo's
connections between its ranks, on 127.0.0.1.

Rank 0 of every DDP or DeepSpeed job hosts PyTorch's TCPStore, the key-value store from which the
ranks learn each other's addresses. It listens on every interface and has no authentication
(PyTorch offers no bind address for it): while a job runs, anyone who reaches the machine can read
and write those keys. When every rank is a process on this machine nothing outside needs to reach
it, so the launching process, which is rank 0 or the parent of every rank, hosts the store itself
on a socket bound to 127.0.0.1, and every rank connects to it as a client (torch's
``TORCHELASTIC_USE_AGENT_STORE`` mode, the one torchrun's agent uses). The store lives and dies
with that process, as the one rank 0 would host does.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import signal
import socket
from typing import Any, Optional

from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ParallelStrategy

# The store this process hosts and its port; replaced for the next job, which must not read a
# finished job's keys.
_hosted: dict[str, Any] = {}
_MARK = "DISTRNN_RENDEZVOUS_PORT"
_GLOO_MARK = "DISTRNN_GLOO_SOCKET_IFNAME"  # the GLOO_SOCKET_IFNAME that distrnn set, not the user


def loopback_interface() -> Optional[str]:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), or None."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def gloo_on_loopback() -> None:
    """Have gloo's connections between ranks listen on the loopback interface. Without
    ``GLOO_SOCKET_IFNAME`` gloo binds the address this machine's hostname resolves to, on most
    machines the network-facing one, for the whole job. A value the user set is kept."""
    current = os.environ.get("GLOO_SOCKET_IFNAME")
    name = loopback_interface()
    if name is None or (current is not None and os.environ.get(_GLOO_MARK) != current):
        return
    os.environ.update({"GLOO_SOCKET_IFNAME": name, _GLOO_MARK: name})


def _gloo_anywhere() -> None:
    """Undo :func:`gloo_on_loopback` for a job whose ranks are not all on this machine (a later job
    of a process that ran a local one: a notebook)."""
    if os.environ.get(_GLOO_MARK) is not None and os.environ.get(_GLOO_MARK) == os.environ.get("GLOO_SOCKET_IFNAME"):
        del os.environ["GLOO_SOCKET_IFNAME"], os.environ[_GLOO_MARK]


def resolves_to_loopback(host: str) -> bool:
    """MASTER_ADDR as torch will dial it: a name (``localhost``, a hostname that /etc/hosts maps
    to 127.0.1.1) counts by its address."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def host_rendezvous_on_loopback(trainer: Trainer) -> Optional[int]:
    """Host the rendezvous store of ``trainer``'s job on 127.0.0.1 and return its port; None where
    that does not apply: no process group (one device without DDP/DeepSpeed), a process that a
    launcher started (torchrun, SLURM, Ray, or Lightning's own child ranks: their environment says
    where the store is), a MASTER_ADDR that is not this machine's loopback (other machines must
    reach rank 0), a process group already initialized in this process.
    A MASTER_PORT set by the user is kept. Several nodes started by hand (``trainer.num_nodes`` > 1,
    ``NODE_RANK``) must each be given MASTER_ADDR and MASTER_PORT (an OSError naming them
    otherwise: the nodes would wait for each other until the rendezvous times out); with a
    loopback MASTER_ADDR they are all this machine, node 0 hosts the store on 127.0.0.1 and the
    others join it (None)."""
    import torch.distributed as dist

    strategy = trainer.strategy
    env = getattr(strategy, "cluster_environment", None)
    # Variables a distrnn launcher set, in this process or in a parent that ran a job in-process
    # (a notebook): that job's store is not this job's; torchrun's agent sets no DISTRNN_ variable.
    ours = "MASTER_PORT" in os.environ and os.environ.get(_MARK) == os.environ["MASTER_PORT"]
    one_machine = resolves_to_loopback(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    if not one_machine:
        _gloo_anywhere()
    if (
        not isinstance(strategy, ParallelStrategy)
        or dist.is_initialized()  # a group this process joined before keeps its store
        or type(env) is not LightningEnvironment
        or env.creates_processes_externally
        or (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not ours)  # torchrun's agent hosts it
    ):
        return None
    if trainer.num_nodes > 1:
        unset = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ or (k == "MASTER_PORT" and ours)]
        if unset:
            raise OSError(f"{' and '.join(unset)}: trainer.num_nodes is {trainer.num_nodes}: set {' and '.join(unset)}"
                          " on every node (node 0's address, a free port there), or the nodes cannot find each other")
    if not one_machine:
        return None
    if trainer.num_nodes > 1 and env.node_rank() > 0:  # node 0, on this machine, hosts the store
        join_store_on_loopback(int(os.environ["MASTER_PORT"]))
        gloo_on_loopback()
        return None
    port = host_store_on_loopback(int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ and not ours else 0)
    os.environ[_MARK] = str(port)
    gloo_on_loopback()
    return port


def host_store_on_loopback(port: int = 0) -> int:
    """Host a TCPStore in this process on 127.0.0.1:``port`` (0: a free port) in place of the one
    rank 0 would open on every interface, point this process's torch.distributed environment at it
    as a client, and return the port. Ranks started from here inherit that environment; others
    (Ray Train's workers) get ``MASTER_ADDR``/``MASTER_PORT``/``TORCHELASTIC_USE_AGENT_STORE`` set
    the same way. Replaces the store this process hosted for a previous job."""
    import torch.distributed as dist

    _hosted.clear()  # the previous job's server stops
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's own store: a port in TIME_WAIT
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        raise OSError(f"MASTER_PORT {port}: cannot host the rendezvous store on 127.0.0.1: {e.strerror}") from None
    port = sock.getsockname()[1]
    # The store listens on the bound socket and owns it from here on.
    store = dist.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=sock.detach(), wait_for_workers=False)
    _hosted.update(store=store, port=port)
    join_store_on_loopback(port)
    return port


def join_store_on_loopback(port: int) -> None:
    """Point this process's torch.distributed environment (and that of the ranks it starts) at
    the store on 127.0.0.1:``port`` as a client."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"})


def release_rendezvous() -> None:
    """Stop the store this process hosts; it is otherwise kept until the next job or the end of the
    process (a notebook that ran a job in-process)."""
    _hosted.clear()


_released_at_exit = False


def release_process_group_at_exit() -> None:
    """Destroy this process's default process group when the interpreter exits, before its
    shutdown begins (once per process; called by the TBPTT module's ``setup`` on every rank).

    Gloo's worker threads drop their references to a collective's tensors a moment after it
    completes. A tensor that has a Python object takes the GIL to be released, and a thread that
    asks for the GIL once the interpreter is shutting down aborts the process ("terminate called
    without an active exception"): 9 of 25 2-rank jobs whose ranks exited right after an
    all-reduce of a Python tensor died so here, and the DDP tests' ranks now and then (Lightning
    destroys the group at exit for NCCL only). Destroying the group first joins those threads
    while the interpreter is whole (0 of 25)."""
    global _released_at_exit
    if not _released_at_exit:
        _released_at_exit = True
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut it short
    try:
        dist.destroy_process_group()
    finally:
        signal.signal(signal.SIGINT, previous)
