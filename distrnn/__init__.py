"""distrnn: distributed training of recurrent networks on long sequences."""

from typing import Any

from distrnn.config import NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig
from distrnn.layers import RECURRENCES, Recurrence, register_recurrence
from distrnn.model import RecurrentModel

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The engine imports Lightning (~4 s): only when asked for, so the layers, the scan and the
    # kernels (`import distrnn.kernels.min_scan`, subprocesses, notebooks) start without it.
    if name == "TBPTTModule":
        from distrnn.engine import TBPTTModule

        return TBPTTModule
    raise AttributeError(f"module 'distrnn' has no attribute {name!r}")

__all__ = [
    "NetworkConfig",
    "OptimizerConfig",
    "RECURRENCES",
    "Recurrence",
    "RecurrentModel",
    "TBPTTConfig",
    "TBPTTModule",
    "TaskSpec",
    "register_recurrence",
]
