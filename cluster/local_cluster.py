"""A local Ray cluster (one head node) for trying distrnn's Ray jobs: `make cluster-up` / `cluster-down`.

    python cluster/local_cluster.py up [--dashboard-host 127.0.0.1] [--num-cpus N] [--state-dir .ray-local]
    source .ray-local/cluster.env      # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/sweep_tiny.yaml
    python cluster/local_cluster.py down   # this cluster's processes only (`ray stop` stops every Ray here)

Token authentication is on (RAY_AUTH_MODE=token, a fresh random token in the state folder, mode
0600): a request without the token is refused. The dashboard (and the job API behind it) binds to
127.0.0.1 unless asked otherwise, and never to another address while authentication is off.
Ports are free ones picked at start, so the cluster never collides with another on the machine.
Every Ray server of the cluster (GCS, raylet, agents, workers) listens on 127.0.0.1 only, the
dashboard on --dashboard-host: the cluster is this machine's alone, no other node can join it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ray_bin() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def up(state: Path, dashboard_host: str, num_cpus: int | None, auth: bool) -> dict[str, str]:
    if not auth and not is_loopback(dashboard_host):
        raise SystemExit(
            f"local_cluster: error: dashboard-host {dashboard_host} is not a loopback address and authentication is"
            " off: anyone who reaches it could run code on this machine. Keep authentication on or bind to 127.0.0.1."
        )
    state.mkdir(parents=True, exist_ok=True)
    env_file = state / "cluster.env"
    if env_file.exists():
        raise SystemExit(f"local_cluster: error: {env_file} exists: a cluster is up (run `down` first)")
    gcs, dash, client, agent, agent_grpc, metrics, rt_agent = free_ports(7)
    temp_dir = Path(f"/tmp/ray-distrnn-{gcs}")  # short: Ray's socket paths have a length limit
    # On Linux Ray replaces a loopback --node-ip-address by the machine's outward address
    # (services.resolve_ip_for_localhost), and its GCS, raylet, agents and workers listen there or on
    # every interface. With this variable at 0 Ray keeps 127.0.0.1 as the node's address, as it does
    # on macOS, and every one of its servers binds to it. Drivers and jobs read the same value from
    # cluster.env, so they address the node as it registered.
    env = {"RAY_AUTH_MODE": "token" if auth else "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if auth:
        token = state / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(token.resolve())
    # Jobs run `python` from the PATH the head was started with: this interpreter's environment.
    run_env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        ray_bin(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", dashboard_host, "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_agent),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    subprocess.run(cmd, env=run_env, check=True, stdout=subprocess.DEVNULL)
    dashboard = f"http://{'127.0.0.1' if dashboard_host in ('0.0.0.0', '::') else dashboard_host}:{dash}"
    info = {
        **env,
        "RAY_ADDRESS": f"127.0.0.1:{gcs}",
        "RAY_API_SERVER_ADDRESS": dashboard,
        "DISTRNN_RAY_TEMP_DIR": str(temp_dir),
    }
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in info.items()))
    (state / "cluster.json").write_text(json.dumps(info, indent=2))
    _wait_for_dashboard(dashboard, info.get("RAY_AUTH_TOKEN_PATH"))
    return info


def _wait_for_dashboard(url: str, token_path: str | None, timeout: float = 60.0) -> None:
    headers = {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"} if token_path else {}
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/api/version", headers=headers), timeout=5):
                return
        except Exception:
            if time.time() > deadline:
                raise SystemExit(f"local_cluster: error: the dashboard at {url} did not answer in {timeout:.0f} s")
            time.sleep(0.5)


def cluster_processes(temp_dir: str, gcs_address: str) -> list:
    """This cluster's processes and no other Ray's on the machine (`ray stop` stops every one):
    those started with its temp folder or its GCS address as an argument (GCS, raylet, dashboard,
    monitors, client server), and all their descendants (agents, workers, job drivers)."""
    import psutil

    def ours(arg: str) -> bool:
        return arg == temp_dir or arg.endswith("=" + temp_dir) or temp_dir + "/" in arg or arg.endswith("=" + gcs_address)

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(ours(a) for a in p.info["cmdline"] or []):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_processes(procs: list, grace: float = 5.0) -> None:
    """SIGTERM, and SIGKILL to what is left after ``grace`` seconds."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def down(state: Path) -> None:
    info_file = state / "cluster.json"
    if not info_file.exists():
        print(f"local_cluster: no cluster recorded in {state}")
        return
    info = json.loads(info_file.read_text())
    temp_dir = info.get("DISTRNN_RAY_TEMP_DIR")
    if not temp_dir:
        # recorded by an older version of this script, which named no folder of its own: its
        # processes cannot be told from another Ray's, and `ray stop` would stop every one
        raise SystemExit(f"local_cluster: error: {info_file} was written by an older distrnn and names no folder of"
                         f" its cluster's own; stop that cluster ({info.get('RAY_ADDRESS')}) with `ray stop` (which stops"
                         f" every Ray cluster of this user on this machine), then remove {info_file}")
    stop_processes(cluster_processes(temp_dir, info["RAY_ADDRESS"]))
    shutil.rmtree(temp_dir, ignore_errors=True)
    for name in ("cluster.env", "cluster.json", "auth_token"):
        (state / name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state-dir", default=".ray-local", help="where the address, ports and token are kept")
    p.add_argument("--dashboard-host", default="127.0.0.1", help="the dashboard's (and job API's) bind address")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    p.add_argument("--no-auth", action="store_true", help="token authentication off (loopback dashboards only)")
    a = p.parse_args(argv)
    state = Path(a.state_dir)
    if a.action == "up":
        info = up(state, a.dashboard_host, a.num_cpus, auth=not a.no_auth)
        print(f"Ray head at {info['RAY_ADDRESS']}, dashboard and job API at {info['RAY_API_SERVER_ADDRESS']}")
        print(f"  source {state / 'cluster.env'}   # then: ray job submit --working-dir . -- python jobs/train.py ...")
    else:
        down(state)


if __name__ == "__main__":
    main()
