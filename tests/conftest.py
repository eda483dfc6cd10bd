import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

from distrnn.denormals import flush_denormals

# Imported at collection, not under a test's capsys: Lightning's log handlers keep the stream
# they were created with. The GPU image (`make gpu-check`) runs only GPU tests and lacks the CLI's
# jsonargparse and MLflow.
try:
    from distrnn.cli import main
except ImportError:
    main = None

REPO = Path(__file__).resolve().parents[1]

# The processes tests start find this environment's tools first (uvicorn, ray, ninja), as in an
# activated venv: `make test` runs `python -m pytest` without activating it. (Before, DeepSpeed's
# torch-extension builds found the system's ninja in some processes and the venv's, another
# version, in Ray's workers, and each rebuilt what the other had built.)
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# Ray runs its workers at nice 15 so that its own servers stay responsive; beside the other
# pytest-xdist worker's processes (nice 0) they then get almost no CPU: a sweep trial's actor
# took 4 minutes to import what it needs on 2 busy cores (20 s at nice 0), and the 2-rank
# failed-trial test took 216 s in CI against 65 s alone (the suite: 16 min; 13 with this). Every
# Ray a test starts (a cluster, a driver's own) reads this.
os.environ["RAY_worker_niceness"] = "0"


def _one_thread_in_a_forked_rank() -> None:
    """In-process multi-rank tests launch their ranks with ``ddp_fork``: a spawned rank spends
    ~8 s importing torch, Lightning and this module again (2 x 9 s for a 2-rank test that takes
    0.3 s forked). A forked child has none of the parent's OpenMP threads, and GNU OpenMP waits
    for them forever in its next parallel region with more than one thread (seen: a 1-rank job
    hung in oneDNN's LSTM). One thread per forked rank, set before Lightning would choose
    cores // ranks (it keeps an OMP_NUM_THREADS that is set)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_in_a_forked_rank)

# The tests compute as distrnn's processes do, subnormal floats flushed (distrnn/denormals.py): an
# in-process `distrnn` command sets it for the rest of its worker, and the tests' float results
# would depend on their order.
flush_denormals()

# pytest-xdist workers share the machine's cores: each process these workers run (the workers
# themselves and the jobs they start) gets its share of threads. With 2 OpenMP threads per process
# on 2 busy cores, each parallel region waited for a descheduled thread: in-process tests that take
# 2.3 s and 2.8 s alone took 27.5 s and 34.6 s in the suite; the suite went from 15:57 to 13:37.
# (Lightning keeps an OMP_NUM_THREADS that is set.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _THREADS = max(1, _CORES // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Optional[Path]:
    """An empty MLflow SQLite store, created once per test process. MLflow builds a new store by
    running its schema migrations, 4.5-7 s on 2 busy cores for every store a test (or a process it
    starts) creates; tests start from a copy instead (test_cli.py + test_resume.py: 160 -> 132 s).
    None without MLflow (the GPU image of `make gpu-check`)."""
    try:
        import mlflow
    except ImportError:
        return None
    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def seed_store(folder: Path, template: Path, name: str = "mlflow.db", artifacts: Optional[str] = None) -> str:
    """``folder/name`` as MLflow would create it there: a copy of ``template`` whose Default
    experiment keeps its artifacts in ``artifacts`` (if not given, ``folder/mlruns/0``: MLflow names
    the creating process's working directory; a server that serves artifacts names
    ``mlflow-artifacts:/0``). Returns its URI."""
    import shutil
    import sqlite3

    db = folder / name
    shutil.copyfile(template, db)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (artifacts or str(folder / "mlruns" / "0"),))
    return f"sqlite:///{db}"


MLFLOW_ADMIN_PASSWORD = "bootstrap-admin-password-0123"


@contextlib.contextmanager
def mlflow_server(tmp_path: Path, auth: bool, template: Optional[Path] = None) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 and a free port, serving artifacts from
    ``tmp_path/artifacts``, with its store in ``tmp_path/server-PORT.db`` (a copy of ``template``
    when given: MLflow's migrations take 4.5-7 s on busy cores) and its log in
    ``tmp_path/server-PORT.log``; yields its URI and always stops it. With ``auth``, it is
    `cluster/mlflow-server.sh` itself (basic-auth, the admin ``MLFLOW_ADMIN_PASSWORD``, a Host
    allow-list); without, a plain `mlflow server` as anyone may start one. Neither starts MLflow's
    job runner (8 more processes, 25 s more to start on 2 busy cores: see the script)."""
    port = free_port()
    db = f"server-{port}.db"
    store = (seed_store(tmp_path, template, db, "mlflow-artifacts:/0") if template is not None
             else f"sqlite:///{tmp_path}/{db}")
    env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": f"test-secret-{port}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if auth:
        ini = tmp_path / "auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{tmp_path}/auth.db\nadmin_username = admin\nadmin_password = {MLFLOW_ADMIN_PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_BACKEND_URI=store, MLFLOW_ARTIFACTS_URI=str(tmp_path / "artifacts"),
                   MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), MLFLOW_ALLOWED_HOSTS=f"127.0.0.1:{port},localhost:{port}",
                   MLFLOW_WORKERS="1")
        env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # the script's own default
        cmd = ["bash", str(REPO / "cluster/mlflow-server.sh")]
    else:
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", store, "--artifacts-destination", str(tmp_path / "artifacts"),
               "--serve-artifacts", "--workers", "1"]
    log = tmp_path / f"server-{port}.log"
    server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(log.read_text()[-3000:])
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # seen once in CI: the uvicorn worker had finished, MLflow's launcher outlived SIGTERM by 30 s
            os.killpg(server.pid, 9)
            server.wait(timeout=30)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, request, store_template):
    """Every test runs in its own folder with its own MLflow store, which starts empty (a copy of
    the template; none at all for tests marked ``fresh_store``: those that check that nothing
    created one, or that processes creating one together do not collide)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    if store_template is not None:
        if request.node.get_closest_marker("fresh_store") is None:
            seed_store(tmp_path, store_template)
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # a URI set by an earlier test wins over the env
    torch.manual_seed(0)
    yield


@pytest.fixture
def loopback_rendezvous():
    """distrnn.rendezvous.host_rendezvous_on_loopback for the trainers a test builds itself (the
    CLI calls it on its own); the variables it sets are gone after the test, so later tests'
    processes do not look for this one's store."""
    from distrnn.rendezvous import host_rendezvous_on_loopback, release_rendezvous

    keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "DISTRNN_RENDEZVOUS_PORT",
            "GLOO_SOCKET_IFNAME", "DISTRNN_GLOO_SOCKET_IFNAME")
    saved = {k: os.environ.pop(k, None) for k in keys}
    yield host_rendezvous_on_loopback
    release_rendezvous()  # the store this test's jobs used stops with the test
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def listening_sockets(pid: Optional[int] = None) -> dict[tuple[str, int], str]:
    """The TCP sockets listening on this machine, or in process ``pid`` and its descendants:
    (address, port) -> the owning process's name."""
    import psutil  # here: the GPU image, which runs only GPU tests, may lack it

    if pid is None:
        conns = [(c, c.pid) for c in psutil.net_connections("tcp")]
    else:
        conns = []
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                conns += [(c, p.pid) for c in p.net_connections("tcp")]
            except psutil.Error:
                pass
    found = {}
    for c, owner in conns:
        if c.status == psutil.CONN_LISTEN:
            try:
                name = psutil.Process(owner).name() if owner else "?"
            except psutil.Error:
                name = "?"
            found[(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)] = name
    return found


def beyond_loopback(sockets: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
    return {k: v for k, v in sockets.items() if not ipaddress.ip_address(k[0]).is_loopback}


class ListeningSockets(threading.Thread):
    """Every ``every`` seconds until stopped, the TCP sockets listening in process ``pid`` or its
    descendants (``pid`` None: anywhere on this machine, for processes that a server such as Ray's
    raylet starts) that were not listening when this started: ``seen`` maps (address, port) to the
    process's name."""

    def __init__(self, pid: Optional[int], every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every, self.seen, self._done = pid, every, {}, threading.Event()
        self.before = listening_sockets(pid)

    def run(self) -> None:
        while not self._done.is_set():
            self.seen.update({k: v for k, v in listening_sockets(self.pid).items() if k not in self.before})
            time.sleep(self.every)

    def stop(self) -> dict[tuple[str, int], str]:
        self._done.set()
        self.join()
        return self.seen

    def exposed(self) -> dict[tuple[str, int], str]:
        return beyond_loopback(self.seen)


@pytest.fixture
def float64():
    """Float64 by default for comparisons at 1e-10 against references."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(path: Path, n: int = 20_000, seed: int = 0) -> Path:
    """A small text with structure worth learning (repeated words), deterministic."""
    g = torch.Generator().manual_seed(seed)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "rnn ", "learns ", "long ", "streams\n"]
    idx = torch.randint(0, len(words), (n // 4,), generator=g).tolist()
    text = "".join(words[i] for i in idx)[:n]
    path.write_text(text)
    return path


def run_installed(*args: str, cwd: Optional[Path] = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The installed `distrnn` script run with ``args``, and the modules it imported."""
    script = Path(sys.executable).parent / "distrnn"
    assert script.is_file(), "the distrnn console script is not installed beside this Python"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # every import, on stderr
    r = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    return r, {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


def distrnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distrnn.cli", *args]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`distrnn ARGS` in this process, as ``python -m distrnn.cli`` runs it: (exit code, stdout,
    stderr). For commands that end quickly (bad input, generate, compare), where a new process
    would spend ~8 s importing Lightning and MLflow; training jobs run as processes."""
    environ = dict(os.environ)
    capsys.readouterr()
    try:
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:  # sys.exit("message"): the interpreter prints it and exits 1
                print(e.code, file=sys.stderr)
                code = 1
        except Exception:  # an uncaught error: traceback and exit code 1, as the interpreter does
            traceback.print_exc()
            code = 1
    finally:
        if main is not None:
            from distrnn.rendezvous import release_rendezvous

            release_rendezvous()  # a multi-rank job run here leaves no server behind
        os.environ.clear()
        os.environ.update(environ)
    out, err = capsys.readouterr()
    return code, out, err


def cuda_available() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# `make test` runs on 2 pytest-xdist workers, file by file, in this order (--dist loadfile
# --no-loadscope-reorder): a module's fixtures, such as test_ray's cluster, are built once
# (`--dist loadgroup` does not group under pytest 9: pytest-xdist issue 1386), and the longest
# files go first, so that neither worker is left with one at the end: test_ray (~8 min alone) on
# one worker while the other works through the rest.
LONGEST_FIRST = ["test_ray.py", "test_faults.py", "test_cli.py", "test_mlflow_server.py", "test_ddp.py",
                 "test_deepspeed.py", "test_resume.py", "test_runs.py", "test_kernels.py", "test_notebooks.py"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))
