"""distrnn: distributed training of recurrent networks on long sequences."""

from typing import Any

__version__ = "0.1.0"

# Each name is imported when first asked for: `distrnn download`, `tokenize` and `runs` start
# without torch (~0.8 s), and the layers, the scan and the kernels (`import distrnn.kernels.min_scan`,
# subprocesses, notebooks) without the engine's Lightning (~4 s).
_WHERE = {
    "NetworkConfig": "distrnn.config",
    "OptimizerConfig": "distrnn.config",
    "TaskSpec": "distrnn.config",
    "TBPTTConfig": "distrnn.config",
    "RECURRENCES": "distrnn.layers",
    "Recurrence": "distrnn.layers",
    "register_recurrence": "distrnn.layers",
    "RecurrentModel": "distrnn.model",
    "TBPTTModule": "distrnn.engine",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'distrnn' has no attribute {name!r}")


__all__ = sorted(_WHERE)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
