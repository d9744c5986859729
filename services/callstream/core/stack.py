"""Run callstream services as child processes: used by `callstream demo` and the integration tests.

Each service is started exactly as an operator would start it (`callstream serve NAME`), configured
through environment variables, and stopped with SIGTERM (graceful shutdown), so the demo and the tests
exercise the real entry points.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from callstream.core import health
from callstream.core.broker import LocalBroker, free_port
from callstream.core.settings import KafkaSettings, TopicSettings

log = logging.getLogger(__name__)

SERVICES = ("llm-engine", "transcriber", "router", "summarizer")

# The environment prefix of each service's settings (see each service's settings.py).
ENV_PREFIX = {
    "transcriber": "CALLSTREAM_TRANSCRIBER_",
    "router": "CALLSTREAM_ROUTER_",
    "summarizer": "CALLSTREAM_SUMMARIZER_",
    "llm-engine": "CALLSTREAM_LLM_ENGINE_",
}


@dataclass
class ServiceProcess:
    """One `callstream serve NAME` child process on its own gRPC port."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    grpc_port: int = 0
    log_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path | None:
        return self.log_dir / f"{self.name}.log" if self.log_dir else None

    def start(self) -> ServiceProcess:
        self.grpc_port = self.grpc_port or free_port()
        prefix = ENV_PREFIX[self.name]
        env = {**os.environ, **self.env, f"{prefix}GRPC_PORT": str(self.grpc_port), "HF_HUB_OFFLINE": "1"}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "callstream", "serve", self.name], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}{self._log_hint()}")
            if health.wait_serving(self.address, timeout_s=1.0):
                return
        raise RuntimeError(f"{self.name} was not SERVING within {timeout_s:.0f} s{self._log_hint()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful: the batch in hand is finished and committed), then SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait(timeout=10)
        code = self.proc.returncode
        self.proc = None
        return code

    def _log_hint(self) -> str:
        if self.log_path and self.log_path.exists():
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            return f"; last lines of {self.log_path}:\n" + "\n".join(tail)
        return ""


def stack_env(
    bootstrap_servers: str, enable_idempotence: bool, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "KAFKA_ENABLE_IDEMPOTENCE": "true" if enable_idempotence else "false",
        **(extra or {}),
    }


@dataclass
class LocalStack:
    """A broker with callstream's topics and the four services as child processes: `callstream demo`'s stack.

    With `bootstrap_servers` (e.g. KAFKA_BOOTSTRAP_SERVERS) that cluster is used; otherwise a local broker of
    `broker_kind` starts on a free loopback port. `start()` does not wait for the models: `wait_ready()` does.
    """

    bootstrap_servers: str | None = None
    broker_kind: str = "noida"
    env: Mapping[str, str] = field(default_factory=dict)  # extra settings for every service
    log_dir: Path | None = None
    broker: LocalBroker | None = None
    services: list[ServiceProcess] = field(default_factory=list)
    idempotent: bool = True

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers if self.broker else (self.bootstrap_servers or "")

    def kafka_settings(self) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.bootstrap, enable_idempotence=self.idempotent)

    def start(self) -> LocalStack:
        import asyncio

        from callstream.core.kafka import ensure_topics

        if not self.bootstrap_servers:
            self.broker = LocalBroker(self.broker_kind).start()  # type: ignore[arg-type]
            self.idempotent = self.broker.supports_idempotence
        else:
            self.idempotent = os.environ.get("KAFKA_ENABLE_IDEMPOTENCE", "true") != "false"
        try:
            asyncio.run(ensure_topics(self.kafka_settings(), TopicSettings().all_topics()))
            env = stack_env(self.bootstrap, self.idempotent, self.env)
            engine = ServiceProcess("llm-engine", env, log_dir=self.log_dir).start()
            self.services.append(engine)
            env["CALLSTREAM_SUMMARIZER_ENGINE_ADDRESS"] = engine.address
            for name in ("transcriber", "router", "summarizer"):
                self.services.append(ServiceProcess(name, env, log_dir=self.log_dir).start())
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float, on_ready: Callable[[ServiceProcess], None] | None = None) -> None:
        for service in self.services:
            service.wait_ready(timeout_s)
            if on_ready is not None:
                on_ready(service)

    def alive(self) -> bool:
        return all(s.proc is not None and s.proc.poll() is None for s in self.services)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
