"""The federation's local processes: loopback ports, readiness, and stopping whole process groups.

The SuperLink and SuperNodes each run in their own session and start `flower-superexec`, which
starts a `flwr-serverapp` or `flwr-clientapp` per run or message: stopping one of them means
stopping its process group and whatever it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
# How long a process gets to exit after SIGTERM before its whole group is killed.
STOP_GRACE_S = 5.0
READY_TIMEOUT_S = 60.0


def free_port(given: set[int] | None = None) -> int:
    """A loopback port nobody listens on right now (the OS picks it) and not in `given`, which it joins.

    Why `given`: a port chosen here stays free until its process binds it, so the OS may pick it again
    for the next process of the federation meanwhile, and the second bind does not fail: Flower's gRPC
    servers set SO_REUSEPORT, so both processes listen on one port and the kernel hands each connection
    to either (seen on a loaded machine: hospitals 0 and 2 on one ClientAppIo port, each ClientApp
    reaching either SuperNode, the round waiting for ever). A federation passes the ports it gave out.
    """
    held = []
    try:
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)  # kept bound until a new port turns up, so the OS cannot repeat itself
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
            if given is None or port not in given:
                if given is not None:
                    given.add(port)
                return port
    finally:
        for sock in held:
            sock.close()


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log_path: Path,
                  timeout: float = READY_TIMEOUT_S) -> None:
    """Until `proc` (or a process it started) listens on `port`. Only its own listener counts: a
    port chosen free can be taken before `proc` binds it (another federation on the machine), and
    a connection would then reach the other process while `proc` fails and exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting; see {log_path}")
        if listens(proc.pid, port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s; see {log_path}")


def listens(pid: int, port: int) -> bool:
    for p in process_tree(pid):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return False


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_process_groups(procs: list[subprocess.Popen], sig: int = signal.SIGTERM,
                        grace: float = STOP_GRACE_S) -> None:
    """Stop processes started in their own sessions, and everything they started.

    Descendants are collected first (one that started its own session would escape the group
    signal), then every group gets `sig` at once, and SIGKILL whatever is left after `grace`.
    """
    tree = [p for proc in procs for p in process_tree(proc.pid)]

    def signal_all(signum: int, targets: list[psutil.Process]) -> None:
        for proc in procs:
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        for p in targets:
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    signal_all(sig, tree)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    if alive:
        signal_all(signal.SIGKILL, alive)
        psutil.wait_procs(alive, timeout=grace)
    for proc in procs:
        try:
            proc.wait(timeout=grace)  # reap our direct children
        except subprocess.TimeoutExpired:
            pass
