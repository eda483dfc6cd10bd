"""`make gpu-check` runs on the device image, which has torch, lightning, triton and pytest but not
jsonargparse, MLflow, Ray or psutil (DeepSpeed comes as carried wheels): on CPU, in an environment
made of this one minus those, the GPU tests must collect and the scripts they run must import.
Device time is scarce; an import error found there costs a session its GPU run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO

MISSING_ON_THE_IMAGE = re.compile(r"(mlflow|jsonargparse|ray|psutil|pandas|pyarrow|deepspeed|distrnn|__editable__)", re.I)


def _image(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(torch.__file__).parents[1].iterdir():  # this environment's site-packages
        if not MISSING_ON_THE_IMAGE.match(entry.name) and entry.suffix != ".pth":
            (site / entry.name).symlink_to(entry)
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(site), str(REPO), str(REPO / "tests")]),
            "PYTHONDONTWRITEBYTECODE": "1"}


def test_gpu_tests_and_scripts_load_without_what_the_device_image_lacks(tmp_path):
    env = _image(tmp_path)
    # -S: no site-packages but the reduced copy
    r = subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "--collect-only", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/test_gpu.py", "tests/test_layers.py", "tests/test_kernels.py"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    collected = re.search(r"(\d+)/\d+ tests collected", r.stdout)
    assert collected and int(collected.group(1)) >= 10, r.stdout[-2000:]
    r = subprocess.run([sys.executable, "-S", "-c", "import mlflow"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0  # the reduced environment really lacks them
    # Collecting runs no fixture. A CPU test like the GPU ones (a Lightning fit of distrnn's module)
    # runs conftest's autouse fixtures, as every GPU test's setup does there (they imported MLflow:
    # every GPU test would have errored on the image).
    r = subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_bptt.py::test_module_update_equals_full_bptt"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 0 and "4 passed" in r.stdout, (r.stdout + r.stderr)[-3000:]
    # the scripts make gpu-check runs, imported as modules (their main() stays behind __main__)
    env["PYTHONPATH"] += os.pathsep + str(REPO / "benchmarks")
    r = subprocess.run([sys.executable, "-S", "-c", "import ds_lightning_check, bench_recurrences, bench_tbptt, learn"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    # with what benchmarks/gpu_wheels.sh carries added back (DeepSpeed, psutil): the DeepSpeed check
    # runs DeepSpeed's universal-checkpoint converter as a module of its own
    site = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    for entry in Path(torch.__file__).parents[1].iterdir():
        if re.match(r"(deepspeed|psutil)", entry.name, re.I):
            (site / entry.name).symlink_to(entry)
    r = subprocess.run([sys.executable, "-S", "-c", "import deepspeed.checkpoint.ds_to_universal"],
                       capture_output=True, text=True, timeout=120, env={**env, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]


def test_device_scripts_parse_and_name_only_shipped_files():
    """Every script a device call runs parses, and every repo file it names exists (a typo there
    is found only after the machine has started)."""
    for script in sorted((REPO / "benchmarks").glob("*.sh")):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, (script.name, r.stderr)
        for name in re.findall(r"\b((?:benchmarks|tests|jobs/configs)/[\w./-]+\.(?:py|sh|yaml))", script.read_text()):
            assert (REPO / name).exists(), (script.name, name)


def test_the_benchmark_of_overlapped_recomputation_runs_and_checks_its_gradients():
    """The checkpointing case with ``overlap`` (model.tbptt.overlap_recompute) times it beside
    the other schemes and reports its gradients' distance from full BPTT's, the check of the
    side streams' ordering on a GPU: on CPU the case runs and the distance is nil."""
    sys.path.insert(0, str(REPO / "benchmarks"))  # also for the case's child process (spawned)
    try:
        import bench_recurrences as bench

        for rec in ("lstm", "mingru"):
            r = bench.run("checkpointing", 120, device="cpu", rec=rec, B=3, T=48, H=8, k=8, rounds=1, overlap=True)
            assert "error" not in r and r["overlapped_max_grad_diff"] < 1e-6, r
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_benchmark_of_the_chunked_cpu_scan_runs_both_ways():
    """``--linear_scan`` times the CPU loop's scan chunked and every step alone, forward and
    backwards in time, in a child process as ``make bench`` runs it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_recurrences as bench

        r = bench.run("linear_scan", 120, device="cpu", B=2, T=40, H=3, repeats=2)
        assert "error" not in r, r
        assert {k for k in r if k.endswith("_ms")} == {f"{w}_{d}_ms" for w in ("chunked", "step_alone") for d in ("forward", "backward")}, r
        assert r["forward_ratio"] > 0 and r["backward_ratio"] > 0, r
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
