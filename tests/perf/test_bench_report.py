"""The benchmark's own logic (bench/): reading wrk, medians, ratios and the targets' verdicts,
with made-up samples; no wrk, NGINX or proxy is started."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from bench import report, wrk
from bench.model import LOADS, Run, Sample, Target

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080/bench/1k
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  500.00us  30.00ms   90.00%
    Req/Sec    30.00k     1.00k   32.00k    70.00%
  Latency Distribution
     50%    1.90ms
     75%    2.20ms
     90%    2.60ms
     99%  850.00us
  300000 requests in 10.00s, 350.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  30000.00
Transfer/sec:     35.00MB
"""


def test_wrk_report_is_read_with_units_and_errors() -> None:
    result = wrk.parse(WRK_OUTPUT)
    assert result.requests == 300_000
    assert result.rps == 30_000
    assert result.p50_ms == 1.9
    assert result.p99_ms == 0.85
    assert (result.socket_errors, result.non_2xx) == (3, 7)


def test_wrk_command_pins_the_client_and_sends_headers() -> None:
    cmd = wrk.command("http://x/", connections=64, duration=10, cpu=1, headers=("A: b",))
    assert cmd[:3] == ["taskset", "-c", "1"]
    assert "-c64" in cmd and "--latency" in cmd and ["-H", "A: b"] == cmd[-3:-1]


def sample(rps: float, p50: float, p99: float, cpu_us: float | None = None) -> Sample:
    result = wrk.WrkResult(
        requests=int(rps * 10), seconds=10, p50_ms=p50, p99_ms=p99, socket_errors=0, non_2xx=0
    )
    cpu = None if cpu_us is None else cpu_us * rps * 10 / 1e6
    return Sample(result, cpu, 10.0, {0: 0.5, 1: 0.9})


def target(name: str, rps: tuple[float, float, float], p50: float, p99: float) -> Target:
    cpu = None if name == "direct" else 100.0
    t = Target(name, "http://x", None, None)
    for load, value in zip(LOADS, rps, strict=True):
        t.samples[load.key] = [sample(value, p50, p99, cpu) for _ in range(3)]
    return t


def make_run(demo_c64: float, demo_p50: float) -> Run:
    targets = [
        target("direct", (20_000, 40_000, 1_500), 0.05, 2.0),
        target("nginx", (3_000, 20_000, 800), 0.20, 5.0),
        target("plain", (1_500, 4_200, 700), 0.25, 8.0),
        target("demo", (1_400, demo_c64, 600), demo_p50, 9.0),
        target("routes1000", (1_400, 4_100, 700), 0.25, 8.0),
    ]
    return Run(
        args=argparse.Namespace(runs=3, duration=10.0),
        targets=targets,
        commands=["wrk ..."],
        foundation={"direct": sample(40_000, 1, 2).result, "plain": sample(3_000, 20, 90).result},
        load_before=(0.1, 0.2, 0.3),
        load_after=(1.0, 1.0, 1.0),
        started=datetime(2026, 1, 1, tzinfo=UTC),
        elapsed_s=600,
        machine={"nproc": "2"},
        versions={"python": "3.11"},
        rss_kib={"nginx": 10_000, "plain": 40_000, "demo": 41_000, "routes1000": 45_000},
        configs={"proxy.conf": "worker_processes 1;"},
    )


def verdicts(run: Run) -> list[bool | None]:
    return [g.ok for g in report.goals(run)]


def test_targets_pass_when_strangler_beats_the_floor() -> None:
    assert verdicts(make_run(demo_c64=4_100, demo_p50=0.27)) == [True] * 6


def test_targets_fail_on_the_ratio_to_nginx_not_on_absolute_numbers() -> None:
    found = report.goals(make_run(demo_c64=3_900, demo_p50=0.29))
    assert [g.ok for g in found[:2]] == [False, False]  # 0.195x req/s, 1.45x p50
    assert found[0].measured == "0.195x"
    assert found[0].runs == "0.20x, 0.20x, 0.20x"


def test_busy_polling_is_reported_beside_the_latency_target_not_instead_of_it() -> None:
    run = make_run(demo_c64=4_100, demo_p50=0.30)  # 1.5x NGINX's 0.20 ms: fails
    run.targets.append(target("busypoll", (1_600, 4_100, 700), 0.26, 8.0))  # 1.3x
    found = report.goals(run)
    assert found[1].text.startswith("demo policies, 1 connection, 1 KiB: p50")
    assert found[2].text.startswith("same, with `listen.busy_poll_us: 200` (opt-in): p50")
    assert [g.ok for g in found[1:3]] == [False, True]
    assert found[2].measured == "1.300x"


def test_results_page_has_every_section() -> None:
    text = report.markdown(make_run(demo_c64=4_100, demo_p50=0.27))
    for heading in ("Quick check", "Targets", "All numbers", "Every run", "noisy", "Commands"):
        assert heading in text
    assert "4,100 (0.20x)" in text  # strangler's cells carry their ratio to NGINX


def test_instruction_count_is_read_from_the_dump_written_after_counting_began(
    tmp_path: Path,
) -> None:
    from bench import instr

    out = tmp_path / "callgrind.out"
    old = tmp_path / "callgrind.out.1"
    old.write_text("events: Ir\nsummary: 5\n")
    before = {old}
    new = tmp_path / "callgrind.out.2"
    new.write_text("version: 1\ncmd: python\nevents: Ir\nfl=x\n1 10\ntotals: 873718527\n")
    assert instr._total(out, before) == 873_718_527


def test_instruction_counts_get_their_table_and_a_routes_verdict_beside_the_timed_one() -> None:
    run = make_run(demo_c64=4_100, demo_p50=0.27)
    assert "Instructions per request" not in report.markdown(run)  # not counted: no section
    run.instructions = {"plain": 368_070.0, "demo": 386_612.0, "routes1000": 368_843.0}
    found = report.goals(run)
    assert found[-1].text.startswith("same, in instructions per request")
    assert (found[-1].measured, found[-1].ok) == ("1.002x", True)
    run.instructions["routes1000"] = 400_000.0  # 8.7% more: fails
    assert report.goals(run)[-1].ok is False
    text = report.markdown(run)
    assert "## Instructions per request" in text
    assert "| strangler, demo policies | 386,612 | 1.050x |" in text
