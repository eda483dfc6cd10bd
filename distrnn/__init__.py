"""distrnn: distributed training of recurrent networks on long sequences."""

from distrnn.config import NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig
from distrnn.engine import TBPTTModule
from distrnn.layers import RECURRENCES, Recurrence, register_recurrence
from distrnn.model import RecurrentModel

__version__ = "0.1.0"

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
