"""Which code trains and where it logs, without Lightning: the tags a run records about its code,
and the environment a Ray job is handed. `make submit-train` computes the latter on every
submission (importing Lightning took ~8 s of it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import mlflow

from distrnn.runs import GIT_BRANCH_TAG, GIT_COMMIT_TAG, GIT_DIRTY_TAG, VERSION_TAG

# The tags of the checkout a Ray job was submitted from (`make submit-train`): Ray uploads the
# working tree without its .git, so the job's own distrnn cannot tell its commit
CODE_TAGS_ENV = "DISTRNN_CODE_TAGS"


ENV_TAG = "distrnn.env."
# libraries whose version is recorded when the run has imported them (a run without DeepSpeed
# does not import it for this)
_LIBRARIES = ("torch", "lightning", "mlflow", "deepspeed", "ray", "triton", "numpy")


def environment_tags(device: Optional[str] = None) -> dict[str, str]:
    """What else decides a run's numbers besides its code and config: Python's version, those of
    the libraries the process has imported (torch with the CUDA it was built for), whether the CPU
    flushes subnormal floats (:func:`distrnn.denormals.subnormals`), and the device (``device``: a
    ``torch.device`` string; CUDA devices by their name). Recorded as tags
    ``distrnn.env.*``; a resume under another environment adds ``resumed.distrnn.env.*``."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    tags = {f"{ENV_TAG}python": platform.python_version()}
    for name in _LIBRARIES:
        if name in sys.modules:
            try:
                tags[f"{ENV_TAG}{name}"] = version(name)
            except PackageNotFoundError:
                pass
    torch = sys.modules.get("torch")
    if torch is not None:
        tags[f"{ENV_TAG}torch"] = torch.__version__
        if torch.version.cuda:
            tags[f"{ENV_TAG}cuda"] = torch.version.cuda
        from distrnn.denormals import subnormals

        tags[f"{ENV_TAG}cpu_subnormals"] = subnormals()
        if device is not None and device.startswith("cuda") and torch.cuda.is_available():
            tags[f"{ENV_TAG}device"] = torch.cuda.get_device_name(torch.device(device))
        elif device is not None:
            tags[f"{ENV_TAG}device"] = device
    return tags


def code_version(source: Optional[Path] = None) -> tuple[dict[str, str], Optional[str]]:
    """Which code trains: ``(tags, diff)``. The tags hold distrnn's version and, when ``source``
    (distrnn's package folder) is tracked in a git checkout, its commit, branch and whether
    tracked files differ from that commit; ``diff`` is then ``git diff HEAD`` (else None).

    MLflow would record the commit of the entry point's checkout, but ``distrnn``'s entry point is
    in the checkout's git-ignored ``.venv``, which MLflow takes for no checkout at all. A distrnn
    installed from a package has no commit: its version only. A Ray job's package (uploaded
    without ``.git``) takes the submitting checkout's tags from ``DISTRNN_CODE_TAGS``, which
    :func:`tracking_env` sets; its uncommitted changes are in the package but
    not in a ``code.diff``."""
    import distrnn

    tags = {VERSION_TAG: distrnn.__version__}
    src = Path(source or Path(distrnn.__file__).resolve().parent)

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        return r.stdout

    try:
        # tracked, not merely inside some checkout (a venv's site-packages below another project's)
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD").strip()
        branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
        diff = git("diff", "HEAD", "--no-color", "--no-ext-diff")
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        try:
            given = json.loads(os.environ.get(CODE_TAGS_ENV) or "{}")
        except ValueError:
            given = None
        if isinstance(given, dict):
            tags.update({str(k): str(v) for k, v in given.items()})
        return tags, None
    tags.update({GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: str(bool(diff)).lower()})
    if branch != "HEAD":  # not a detached head
        tags[GIT_BRANCH_TAG] = branch
    return tags, diff or None


def tracking_env() -> dict[str, str]:
    """Workers log where the driver would: the tracking URI resolved here, a relative SQLite path
    made absolute (workers run in other folders), and the code's git tags as resolved here (a
    job's package has no .git: :func:`code_version`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return {"MLFLOW_TRACKING_URI": uri, CODE_TAGS_ENV: json.dumps(code_version()[0], separators=(",", ":"))}
