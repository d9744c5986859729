"""Load tests: TLS channels, the Kafka result and report (without a broker), `bench all`'s tables, --help."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from callstream.bench.all import LOADTEST, Section, loadtest_rows, markdown_table, update_section
from callstream.cli import app
from callstream.core.settings import KafkaSettings, TopicSettings
from callstream.loadtest.grpc_load import grpc_loadtest
from callstream.loadtest.kafka_load import Event, KafkaPlan, KafkaRun, schedule
from callstream.loadtest.render import render_result
from callstream.loadtest.runner import LoadPlan
from callstream.loadtest.targets import TlsOptions
from callstream.v1 import router_pb2_grpc
from tests.unit.test_loadtest_grpc import FakeRouter
from tests.unit.test_loadtest_report import cells, lookup, synthetic_result

# --- TLS -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=callstream-test"]
        + ["-addext", "subjectAltName=DNS:callstream-test", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def _tls_run(cert: Path, key: Path, tls: TlsOptions) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(FakeRouter(), server)
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            plan = LoadPlan(mode="closed", concurrency=2, duration_s=None, requests=10, deadline_s=5.0)
            return await grpc_loadtest(
                service="router", target=f"127.0.0.1:{port}", plan=plan, target_kwargs={"tls": tls}, live=False
            )
        finally:
            await server.stop(0)

    return asyncio.run(go())


def test_tls_with_a_ca_file_and_a_server_name(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    ok = _tls_run(cert, key, TlsOptions(enabled=True, ca_cert=cert, server_name="callstream-test"))
    assert ok["status_counts"] == {"OK": 10}
    # Without the right name the certificate does not verify: every request fails, as UNAVAILABLE.
    bad = _tls_run(cert, key, TlsOptions(enabled=True, ca_cert=cert, server_name="someone-else"))
    assert bad["status_counts"] == {"UNAVAILABLE": 10}


def test_tls_insecure_skip_verify_trusts_a_self_signed_server(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    result = _tls_run(cert, key, TlsOptions(enabled=True, insecure_skip_verify=True))
    assert result["status_counts"] == {"OK": 10}
    assert result["config"]["tls"]["insecure_skip_verify"] is True


# --- Kafka result, without a broker ----------------------------------------------------------------------------


def test_kafka_schedule_interleaves_both_kinds_at_their_rates() -> None:
    events = schedule(KafkaPlan(tickets_rate=2, calls_rate=0.5, duration_s=4))
    assert [e for e in events if e[1] == "call"] == [(0.0, "call", 0), (2.0, "call", 1)]
    assert [e[0] for e in events if e[1] == "ticket"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert len(schedule(KafkaPlan(tickets_rate=100, tickets=3, duration_s=None))) == 3
    with pytest.raises(ValueError):
        KafkaPlan(tickets_rate=1, duration_s=None).validate()


def test_kafka_result_and_report_from_events() -> None:
    topics = TopicSettings()
    run = KafkaRun(KafkaSettings(), topics, KafkaPlan(tickets_rate=1, calls_rate=1, duration_s=2), [], [])
    tr, ro, su = topics.calls_transcribed, topics.tickets_routed, topics.tickets_summarized
    run.events = {
        "c0": Event("c0", "call", 0.0, 0.01, {tr: 5.0, ro: 5.5, su: 20.0}, final=20.0),
        "t0": Event("t0", "ticket", 0.0, 0.01, {ro: 0.5, su: 10.0}, final=10.0),
        "t1": Event("t1", "ticket", 1.0, 1.01, {ro: 1.25}, dead_letter=(ro, "SummaryValidationError")),
    }
    run.lag_t = [0.0, 1.0, 2.0]
    run.lag = {"callstream-transcriber": [1, 0, 0], "callstream-router": [1, 1, 0], "callstream-summarizer": [0, 2, 1]}
    run.collect_end = 20.0
    result = run.result({"name": "k"}, {"cpus": 2}, include_samples=True)
    s = result["summary"]
    assert (s["published"], s["completed"], s["dead_lettered"], s["missing"]) == (3, 2, 1, 0)
    assert s["e2e_ms"]["p50"] == 10000.0 and s["e2e_ms"]["max"] == 20000.0
    assert s["e2e_ms_by_kind"]["call"]["p50"] == 20000.0
    assert result["stages"][ro]["latency_ms"]["count"] == 3
    # Time in the router stage: from the event for tickets, from the transcript for the call.
    assert sorted([result["stages"][ro]["stage_time_ms"]["min"], result["stages"][ro]["stage_time_ms"]["max"]]) == [
        250.0,
        500.0,
    ]
    assert result["lag"]["max"] == {"callstream-transcriber": 1, "callstream-router": 1, "callstream-summarizer": 2}
    assert result["status_counts"] == {"summarized": 2, f"dead letter {ro}: SummaryValidationError": 1}
    page = render_result(result)
    shown = cells(page)
    for metric in (
        "summary.e2e_ms.p50",
        "summary.e2e_ms.p95",
        f"stages[{ro}].latency_ms.p50",
        "lag.max[callstream-summarizer]",
    ):
        assert float(shown[metric][1]) == lookup(result, metric), metric
    assert page.count("data:image/png;base64,") >= 5


# --- bench all -------------------------------------------------------------------------------------------------


def test_bench_all_replaces_only_its_own_block_inside_its_section() -> None:
    doc = "# Benchmarks\n\n## LLM engine\n\ntheirs\n\n## Load tests\n\nhand-written intro\n\n## Other\n\nkeep\n"
    once = update_section(doc, LOADTEST, "| a |\n|---|\n| 1 |")
    assert once.index("hand-written intro") < once.index("bench-all:loadtest:begin") < once.index("## Other")
    twice = update_section(once, LOADTEST, "| a |\n|---|\n| 2 |")
    assert "| 2 |" in twice and "| 1 |" not in twice
    assert twice.replace("| 2 |", "| 1 |") == once
    assert "theirs" in twice and "keep" in twice
    # A missing section is added at the end.
    added = update_section("# Benchmarks\n", Section("x", "## X"), "table")
    assert added.endswith("## X\n\n<!-- bench-all:x:begin -->\ntable\n<!-- bench-all:x:end -->\n")


def test_bench_all_table_rows_come_from_the_results() -> None:
    result = synthetic_result()
    rows = loadtest_rows([result])
    assert rows[0]["p99 (ms)"] == result["summary"]["latency_ms"]["p99"]
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| service | mode |") and "router" in table


def test_every_loadtest_command_has_help() -> None:
    runner = CliRunner()
    for args, words in (
        (["loadtest", "--help"], ["grpc", "kafka", "compare", "report"]),
        (["loadtest", "grpc", "--help"], ["--rate", "--concurrency", "--ramp-up", "--insecure-skip-verify"]),
        (["loadtest", "kafka", "--help"], ["--start-stack", "--tickets-rate", "--drain-timeout"]),
        (["loadtest", "compare", "--help"], ["--threshold", "Exit code"]),
        (["loadtest", "report", "--help"], ["HTML"]),
        (["bench", "all", "--help"], ["docs/benchmarks.md"]),
    ):
        out = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert out.exit_code == 0, out.output
        for word in words:
            assert word in out.output, (args, word)


def test_grpc_command_refuses_bad_arguments() -> None:
    runner = CliRunner()
    both = runner.invoke(app, ["loadtest", "grpc", "-s", "router", "-t", "127.0.0.1:1", "--rate", "1", "-c", "2"])
    assert both.exit_code == 2 and "exactly one" in both.output
    ramp = runner.invoke(
        app, ["loadtest", "grpc", "-s", "router", "-t", "127.0.0.1:1", "-r", "1", "-d", "2", "--ramp-up", "5"]
    )
    assert ramp.exit_code == 2
