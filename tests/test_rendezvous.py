"""Where a job's torch.distributed rendezvous store listens (distrnn.rendezvous): on 127.0.0.1 for
a job whose ranks are all launched from this process, nowhere new where another launcher owns it.
The jobs that train through it are in test_ddp.py and test_faults.py."""

from __future__ import annotations

import os
import socket

import lightning as L
import psutil
import pytest

from conftest import cli, write_corpus


def _listening_here() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kw)


def test_a_single_node_job_gets_a_store_on_loopback_and_the_next_job_a_new_one(loopback_rendezvous):
    os.environ["MASTER_ADDR"] = "localhost"  # a name for this machine counts (the fixture restores it)
    port = loopback_rendezvous(_trainer(devices=2, strategy="ddp_spawn"))
    assert ("127.0.0.1", port) in _listening_here()
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == str(port)
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"  # every rank, rank 0 too, is a client
    second = loopback_rendezvous(_trainer(devices=2, strategy="ddp"))
    assert second != port and ("127.0.0.1", second) in _listening_here()
    assert ("127.0.0.1", port) not in _listening_here()  # the finished job's keys are gone with its store


def test_a_process_started_by_a_distrnn_job_hosts_its_own_store(loopback_rendezvous):
    """A job launched from a process that ran one in-process (a notebook) inherits that job's
    variables; it must not join that job's store."""
    from distrnn.rendezvous import release_rendezvous

    inherited = loopback_rendezvous(_trainer(devices=2, strategy="ddp"))
    release_rendezvous()  # a child process hosts nothing, and the store stops when released
    assert ("127.0.0.1", inherited) not in _listening_here()
    port = loopback_rendezvous(_trainer(devices=2, strategy="ddp"))
    assert port != inherited and os.environ["MASTER_PORT"] == str(port)


@pytest.mark.parametrize(
    "env,kw",
    [
        ({}, {"devices": 1}),  # one process, no process group
        ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, {"devices": 2, "strategy": "ddp", "num_nodes": 2}),  # other machines
        ({"MASTER_ADDR": "10.0.0.1"}, {"devices": 2, "strategy": "ddp"}),  # rank 0 is elsewhere
        ({"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_PORT": "29400"}, {"devices": 2, "strategy": "ddp"}),  # torchrun
        ({"LOCAL_RANK": "1"}, {"devices": 2, "strategy": "ddp"}),  # a rank Lightning's launcher started
    ],
)
def test_no_store_where_another_launcher_owns_the_rendezvous(loopback_rendezvous, monkeypatch, env, kw):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _listening_here()
    assert loopback_rendezvous(_trainer(**kw)) is None
    assert _listening_here() <= before
    assert os.environ.get("MASTER_PORT") == env.get("MASTER_PORT")


def test_nodes_started_by_hand_need_an_address_and_port_and_on_this_machine_meet_on_loopback(
        loopback_rendezvous, monkeypatch, tmp_path, capsys):
    """Several nodes started by hand (NODE_RANK, trainer.num_nodes): without MASTER_ADDR and
    MASTER_PORT one error naming them (each node would otherwise wait for the others until the
    rendezvous timed out; `distrnn fit`: exit 2, before any checkpoint). With a loopback MASTER_ADDR every node is this machine: node 0 hosts
    the store on 127.0.0.1 at MASTER_PORT, node 1 joins it as a client and opens nothing. The job
    that trains so is in test_ddp.py."""
    from conftest import free_port

    with pytest.raises(OSError, match="^MASTER_ADDR and MASTER_PORT: trainer.num_nodes is 2: set"):
        loopback_rendezvous(_trainer(devices=1, strategy="ddp", num_nodes=2))
    write_corpus(tmp_path / "corpus.txt", 4000)
    (tmp_path / "job.yaml").write_text(
        "trainer: {max_steps: 2, accelerator: cpu, devices: 1, num_nodes: 2, strategy: ddp, enable_progress_bar: false}\n"
        "model: {network: {recurrence: gru, hidden_size: 8}, tbptt: {k1: 8}}\n"
        f"data: {{class_path: distrnn.data.ByteCorpusDataModule, init_args: {{path: {tmp_path / 'corpus.txt'}, batch_size: 2, seq_len: 8}}}}\n"
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "fit", "--config", str(tmp_path / "job.yaml"))
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "distrnn: error: MASTER_ADDR and MASTER_PORT: trainer.num_nodes is 2: set MASTER_ADDR and MASTER_PORT on every node"), err[-2000:]
    assert not (tmp_path / "checkpoints").exists()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(OSError, match="^MASTER_PORT: trainer.num_nodes is 2"):
        loopback_rendezvous(_trainer(devices=1, strategy="ddp", num_nodes=2))
    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("NODE_RANK", "1")
    before = _listening_here()
    assert loopback_rendezvous(_trainer(devices=1, strategy="ddp", num_nodes=2)) is None
    assert _listening_here() <= before
    assert (os.environ["MASTER_PORT"], os.environ["TORCHELASTIC_USE_AGENT_STORE"]) == (str(port), "True")
    monkeypatch.setenv("NODE_RANK", "0")
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE")
    assert loopback_rendezvous(_trainer(devices=1, strategy="ddp", num_nodes=2)) == port
    assert ("127.0.0.1", port) in _listening_here()


def test_a_busy_master_port_is_one_line_exit_2(tmp_path, capsys, loopback_rendezvous):
    """MASTER_PORT set by the user is kept; taken already, `distrnn fit` stops before training,
    naming it, with no MLflow run and no checkpoint."""
    write_corpus(tmp_path / "corpus.txt", 4000)
    (tmp_path / "job.yaml").write_text(
        "trainer: {max_steps: 2, accelerator: cpu, devices: 2, strategy: ddp, enable_progress_bar: false}\n"
        "model: {network: {recurrence: gru, hidden_size: 8}, tbptt: {k1: 8}}\n"
        f"data: {{class_path: distrnn.data.ByteCorpusDataModule, init_args: {{path: {tmp_path / 'corpus.txt'}, batch_size: 2, seq_len: 8}}}}\n"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        os.environ["MASTER_PORT"] = str(busy.getsockname()[1])  # the fixture restores it
        code, _, err = cli(capsys, "fit", "--config", str(tmp_path / "job.yaml"))
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("distrnn: error: MASTER_PORT") and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "checkpoints").exists()
    import mlflow

    assert not (tmp_path / "mlflow.db").exists() or mlflow.search_runs(search_all_experiments=True).empty


def test_gloo_connects_a_local_jobs_ranks_over_loopback_and_keeps_a_users_choice(loopback_rendezvous, monkeypatch):
    """Without GLOO_SOCKET_IFNAME gloo listens on the address the hostname resolves to (on most
    machines the network-facing one; here /etc/hosts maps it to 127.0.0.1, so the jobs watched in
    test_ddp/test_faults cannot tell): a local job names the loopback interface, a job on
    several nodes does not inherit that, and a value the user set stays."""
    from distrnn.rendezvous import loopback_interface

    lo = loopback_interface()
    assert lo is not None and any(name == lo for _, name in socket.if_nameindex())
    assert lo in {nic for nic, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs)}
    loopback_rendezvous(_trainer(devices=2, strategy="ddp"))
    assert os.environ["GLOO_SOCKET_IFNAME"] == lo
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # a later job in this process, on several machines
    monkeypatch.setenv("MASTER_PORT", "29500")
    loopback_rendezvous(_trainer(devices=2, strategy="ddp", num_nodes=2))
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    loopback_rendezvous(_trainer(devices=2, strategy="ddp"))
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"
