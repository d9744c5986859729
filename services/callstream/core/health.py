"""Client side of grpc.health.v1 and reflection: used by `callstream health`, the demo and the tests."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) of `service` at `address`."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def wait_serving(address: str, timeout_s: float, service: str = "", poll_s: float = 0.25) -> bool:
    """Poll until SERVING or the timeout passes (a bounded loop)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check(address, service, timeout_s=1.0) == "SERVING":
                return True
        except grpc.RpcError:
            pass
        time.sleep(poll_s)
    return False


def list_services(address: str, timeout_s: float = 2.0) -> list[str]:
    """Service names that the server lists through reflection."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=timeout_s
        )
        for response in responses:
            return sorted(s.name for s in response.list_services_response.service)
    return []
