"""A cluster of real `loom sm` and `loom node` processes on 127.0.0.1, for benchmarks,
end-to-end tests and (later) `loom cluster up`. Every process is a child we started; we
stop only those, by PID."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
STOP_TIMEOUT_S = 10.0


@dataclass(slots=True)
class LocalCluster:
    data_dir: Path
    lease_ms: float = 1000.0
    processes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def _spawn(self, name: str, *args: str) -> None:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", "loom.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the process listens
        match = LISTENING.search(line)
        if match is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{name} did not start: {line!r}")
        self.processes[name] = proc
        self.ports[name] = int(match.group(1))

    def start_manager(self) -> int:
        self._spawn("sm", "sm", "--listen", "127.0.0.1:0", "--data", str(self.data_dir / "sm"))
        return self.ports["sm"]

    def start_node(self, name: str) -> int:
        self._spawn(
            name,
            "node", "--id", name, "--listen", "127.0.0.1:0",
            "--sm", f"127.0.0.1:{self.ports['sm']}",
            "--data", str(self.data_dir / name),
            "--lease-ms", str(self.lease_ms),
        )  # fmt: skip
        return self.ports[name]

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to flush or say goodbye."""
        proc = self.processes.pop(name)
        self.ports.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
        _close(proc)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _close(proc)
        self.processes.clear()
        self.ports.clear()


def _close(proc: subprocess.Popen[str]) -> None:
    if proc.stdout is not None:
        proc.stdout.close()
