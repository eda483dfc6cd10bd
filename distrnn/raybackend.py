"""Ray Train's torch backend, with the job's rendezvous store on 127.0.0.1 when its node is.

Ray's backend has rank 0 open PyTorch's TCPStore (no authentication) on every interface for the
whole training. On a node whose Ray address is loopback (`cluster/local_cluster.py`, or a driver
that starts its own Ray: every worker is on this machine) nothing outside needs to reach it, so
rank 0 hosts the store on a socket bound to 127.0.0.1 (`distrnn.rendezvous`), every rank joins it
as a client and gloo connects the ranks over the loopback interface; everywhere else Ray's own
setup runs unchanged. Imported only where Ray is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from distrnn.rendezvous import resolves_to_loopback

try:  # the address Ray's own setup would give the store; Train v1's worker group
    from ray.train._internal.utils import get_address_and_port
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
except ImportError:  # pragma: no cover - moved in a later Ray: Ray's own setup then
    get_address_and_port = V1WorkerGroup = None


def _host_store() -> int:
    from distrnn.rendezvous import host_store_on_loopback

    return host_store_on_loopback()


def _join_store(port: int) -> None:
    from distrnn.rendezvous import gloo_on_loopback, join_store_on_loopback

    join_store_on_loopback(port)
    gloo_on_loopback()


def _release_store() -> None:
    from distrnn.rendezvous import release_rendezvous

    release_rendezvous()


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        resources = worker_group.get_resources_per_worker()
        # Ray's setup for what this does not cover: TPUs (their own rendezvous), tcp:// init
        if get_address_and_port is None or backend_config.init_method != "env" or resources.get("TPU", 0) > 0:
            return super().on_start(worker_group, backend_config)
        addr, _ = worker_group.execute_single(0, get_address_and_port)
        if not resolves_to_loopback(addr):
            return super().on_start(worker_group, backend_config)
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        port = worker_group.execute_single(0, _host_store)
        worker_group.execute(_join_store, port=port)
        if not isinstance(worker_group, V1WorkerGroup):  # v1 sets LOCAL_RANK etc. at training start
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                              world_size=len(worker_group), init_method="env://",
                                              timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])

    def on_shutdown(self, worker_group: Any, backend_config: TorchConfig) -> None:
        super().on_shutdown(worker_group, backend_config)  # the ranks leave the group first
        worker_group.execute_single(0, _release_store)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend keeps the rendezvous store on 127.0.0.1 on a loopback node."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend
