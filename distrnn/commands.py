"""The ``distrnn`` command. distrnn's own commands (generate, download, tokenize, convert-checkpoint,
runs) start here without importing Lightning's CLI and what it pulls in (~3 s a call); fit,
validate, test and predict go on to LightningCLI (:mod:`distrnn.cli`)."""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn, Optional

# distrnn's own commands beside Lightning's fit/validate/test/predict: name -> (module, function
# taking the remaining arguments, what it does); named in --help
OWN_COMMANDS = {
    "generate": ("distrnn.generate", "main", "sample text from a checkpoint or a registered model"),
    "download": ("distrnn.data.download", "main", "a public corpus"),
    "tokenize": ("distrnn.data.tokenizer", "main", "text files to token ids with a tokenizer.json"),
    "convert-checkpoint": ("distrnn.checkpoint_files", "convert_main", "a DeepSpeed directory to one file"),
    "runs": ("distrnn.runs", "main", "compare: an experiment's MLflow runs side by side"),
}


def fail(message: str) -> NoReturn:
    print(f"distrnn: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_own_command(argv: list[str]) -> NoReturn:
    module, function, _ = OWN_COMMANDS[argv[0]]
    sys.exit(getattr(importlib.import_module(module), function)(argv[1:]))


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_COMMANDS:
        run_own_command(argv)
    from distrnn.cli import main as lightning_main

    lightning_main(argv)
