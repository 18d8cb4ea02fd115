"""A throwaway SLURM cluster on this host, for testing the project's sbatch scripts against real daemons.

One ``munged`` with its own key and socket, one ``slurmctld`` and N ``slurmd`` "fake nodes", all in a
directory of their own, started in the foreground and stopped by PID (never by name: the host may run
other daemons). Fake node names are added to ``/etc/hosts`` for 127.0.0.1 and removed again, because
scripts resolve ``scontrol show hostnames`` to find the master. Needs root and Debian's ``slurm-wlm``,
``munge`` (and ``libpmix2`` for ``srun --mpi=pmix``): ``bash tests/install_cluster_packages.sh``.

By hand::

    python tests/local_slurm.py start /tmp/cluster      # prints the SLURM_CONF to export
    SLURM_CONF=/tmp/cluster/slurm.conf sbatch --wait launch/slurm/torchrun.sbatch ...
    python tests/local_slurm.py stop /tmp/cluster
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")
HOSTS = Path("/etc/hosts")


def missing() -> str | None:
    """Why a cluster cannot start here (None if it can)."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (munged and slurmd run as system users)"
    absent = [name for name in DAEMONS if not shutil.which(name)]
    if absent:
        return (
            f"{', '.join(absent)} not installed: run `bash tests/install_cluster_packages.sh` (Debian slurm-wlm, munge)"
        )
    return None


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class LocalSlurm:
    """slurmctld + ``nodes`` slurmd on this host, configured under ``root``.

    Args:
        root: empty or absent directory that holds keys, config, state, logs and PIDs.
        nodes: number of fake nodes.
        cpus: CPUs each fake node advertises (all share the host's cores).
    """

    def __init__(self, root: str | Path, nodes: int = 2, cpus: int | None = None):
        self.root = Path(root).resolve()
        self.nodes = [f"rosenode{i + 1}" for i in range(nodes)]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # munged runs as the munge user, which cannot enter private temporary directories (pytest's are
        # 0700): its key, socket and logs live in a directory of their own, named after ``root``
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        self.munge_dir = Path(tempfile.gettempdir()) / f"rose_ds-munge-{digest}"

    # -- set-up ---------------------------------------------------------------------------------
    def _munge(self) -> list[str]:
        munge = pwd.getpwnam("munge")
        home = self.munge_dir
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(mode=0o700)
        key = home / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        for path in (home, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        # munged refuses group/world-writable parents of its socket unless forced; tmp dirs are 1777.
        return ["runuser", "-u", "munge", "--", "munged", "--foreground", "--force", f"--key-file={key}",
                f"--socket={home / 'socket'}", f"--pid-file={home / 'munged.pid'}", f"--log-file={home / 'log'}",
                f"--seed-file={home / 'seed'}"]  # fmt: skip

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        pmix = any(Path("/usr/lib").glob("*/slurm-wlm/mpi_pmix.so"))
        for sub in ("state", "spool", "log", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "tmp" / node).mkdir(exist_ok=True)
            (self.root / "spool" / node).mkdir(exist_ok=True)
        lines = [
            "ClusterName=rosetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_dir / 'socket'}",
            # cgroup plugins fail here and drain the node while jobs still report COMPLETED
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SlurmdParameters=config_overrides",
            f"MpiDefault={'pmix' if pmix else 'none'}",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.%n.log'}",
            # one PMIx/tmp directory per fake node: they share the host's file system
            f"TmpFS={self.root / 'tmp' / '%n'}",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=FORCE:4")  # fmt: skip
        self.conf.write_text("\n".join(lines) + "\n")

    def _hosts(self, add: bool) -> None:
        marker = f"# rose_ds local_slurm {self.root}"
        kept = [line for line in HOSTS.read_text().splitlines() if not line.endswith(marker)]
        if add:
            kept += [f"127.0.0.1 {node} {marker}" for node in self.nodes]
        HOSTS.write_text("\n".join(kept) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> int:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        pids = self._pids()
        pids[name] = proc.pid
        (self.root / "pids.json").write_text(json.dumps(pids))
        return proc.pid

    def _pids(self) -> dict[str, int]:
        path = self.root / "pids.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _wait_for(self, what: str, check, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        files = [*sorted((self.root / "log").glob("*")), self.munge_dir / "log"]
        logs = "\n".join(p.read_text()[-1500:] for p in files if p.is_file())
        raise RuntimeError(f"local SLURM: {what} did not come up within {timeout:.0f} s\n{logs}")

    def start(self) -> LocalSlurm:
        """Writes the configuration and starts munged, slurmctld and the slurmd's; waits until all nodes are idle."""
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        if self.root.exists() and any(self.root.iterdir()):
            raise RuntimeError(f"{self.root} is not empty: give the cluster a fresh directory")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "log").mkdir()
        munged = self._munge()
        self._write_conf()
        self._hosts(add=True)
        self._spawn("munged", munged)
        self._wait_for("munged", lambda: (self.munge_dir / "socket").exists())
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait_for(
            "slurmctld", lambda: self._quiet(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"])
        )
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for("the slurmd nodes", self._all_idle)
        return self

    def _out(self, cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env).stdout

    def _quiet(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, capture_output=True, env=self.env).returncode == 0

    def _all_idle(self) -> bool:
        states = self._out(["sinfo", "-h", "-N", "-o", "%N %t"]).split()
        return len(states) == 2 * len(self.nodes) and all(s.startswith("idle") for s in states[1::2])

    # -- tear-down ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stops every daemon this cluster started (by PID) and removes the /etc/hosts entries."""
        pids = self._pids()
        # munged last: the slurmd's and slurmctld talk to it while shutting down
        order = [n for n in pids if n.startswith("slurmd")] + [n for n in ("slurmctld", "munged") if n in pids]
        for name in order:
            _terminate(pids[name])
        self._hosts(add=False)
        (self.root / "pids.json").unlink(missing_ok=True)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the daemon's process group, then SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not our child (stopped from another process): poll for existence
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("root", help="directory for the cluster's config, state, logs and PIDs")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    cluster = LocalSlurm(args.root, nodes=args.nodes)
    if args.action == "start":
        started = time.monotonic()
        cluster.start()
        print(f"cluster up in {time.monotonic() - started:.1f} s: export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()


if __name__ == "__main__":
    main()
