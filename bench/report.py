"""Medians, ratios to NGINX, the targets' pass/fail, and bench/RESULTS.md."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bench.model import CLIENT_CPU, LOADS, MIB, PROXY_CPU, Run, Sample, Target

STRANGLER = ("plain", "demo", "routes1000", "busypoll")
LABELS = {
    "direct": "direct to origin",
    "nginx": "NGINX proxy (reference)",
    "plain": "strangler, 1 plain route",
    "demo": "strangler, demo policies",
    "routes1000": "strangler, 1,000 routes",
    "busypoll": "strangler, demo policies, busy_poll_us 200",
}


@dataclass(frozen=True)
class Summary:
    """Medians over the runs of one target, per load key."""

    rps: dict[str, float]
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]
    cpu_us: dict[str, float | None]
    busy: dict[str, float | None]
    failures: int
    rss_mib: float | None
    rss_start_mib: float | None

    def mib_s(self, key: str = "c8_1m") -> float:
        load = next(load for load in LOADS if load.key == key)
        return self.rps.get(key, float("nan")) * load.body_bytes / MIB


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(target: Target, rss_kib: int | None) -> Summary:
    def each(pick: Callable[[Sample], float | None]) -> dict[str, float | None]:
        return {key: _median([pick(s) for s in samples]) for key, samples in target.samples.items()}

    def each_float(pick: Callable[[Sample], float]) -> dict[str, float]:
        return {k: v if v is not None else float("nan") for k, v in each(pick).items()}

    failures = sum(
        s.result.non_2xx + s.result.socket_errors for ss in target.samples.values() for s in ss
    )
    return Summary(
        rps=each_float(lambda s: s.result.rps),
        p50_ms=each_float(lambda s: s.result.p50_ms),
        p99_ms=each_float(lambda s: s.result.p99_ms),
        cpu_us=each(lambda s: s.cpu_us_per_request),
        busy=each(lambda s: s.proxy_busy),
        failures=failures,
        rss_mib=rss_kib / 1024 if rss_kib is not None else None,
        rss_start_mib=target.rss_start_kib / 1024 if target.rss_start_kib is not None else None,
    )


def summaries(run: Run) -> dict[str, Summary]:
    return {t.name: summarize(t, run.rss_kib.get(t.name)) for t in run.targets}


@dataclass(frozen=True)
class Goal:
    text: str
    measured: str
    ok: bool | None  # None: not measured in this run
    runs: str = ""  # the same quantity in each run, to show how much it moved


def _per_run(
    run: Run, name: str, ref: str | None, key: str, pick: Callable[[Sample], float]
) -> list[float]:
    """`pick` of each run of target `name` (divided by that of the same run of `ref`):
    the runs are interleaved, so run i of both was measured seconds apart."""
    by_name = {t.name: t for t in run.targets}
    if name not in by_name or (ref is not None and ref not in by_name):
        return []
    values = [pick(s) for s in by_name[name].samples.get(key, [])]
    if ref is None:
        return values
    refs = [pick(s) for s in by_name[ref].samples.get(key, [])]
    return [v / r for v, r in zip(values, refs, strict=False) if r]


def _runs_text(values: list[float], unit: str) -> str:
    return ", ".join(f"{v:.2f}{unit}" for v in values) if len(values) > 1 else ""


def goals(run: Run) -> list[Goal]:
    by_name = summaries(run)
    ngx, demo = by_name.get("nginx"), by_name.get("demo")
    plain, many = by_name.get("plain"), by_name.get("routes1000")
    found: list[Goal] = []

    def rps(s: Sample) -> float:
        return s.result.rps

    def p50(s: Sample) -> float:
        return s.result.p50_ms

    def p99(s: Sample) -> float:
        return s.result.p99_ms

    def ratio_goal(
        text: str, value: float | None, ok: Callable[[float], bool], runs: list[float]
    ) -> None:
        if value is None:
            found.append(Goal(text, "not measured", None))
        else:
            found.append(Goal(text, f"{value:.3f}x", ok(value), _runs_text(runs, "x")))

    ratio_goal(
        "demo policies, 64 connections, 1 KiB: req/s >= 0.20x NGINX",
        demo.rps["c64"] / ngx.rps["c64"] if demo and ngx else None,
        lambda r: r >= 0.20,
        _per_run(run, "demo", "nginx", "c64", rps),
    )
    ratio_goal(
        "demo policies, 1 connection, 1 KiB: p50 latency <= 1.4x NGINX",
        demo.p50_ms["c1"] / ngx.p50_ms["c1"] if demo and ngx else None,
        lambda r: r <= 1.4,
        _per_run(run, "demo", "nginx", "c1", p50),
    )
    busy = by_name.get("busypoll")
    if busy is not None:  # an opt-in setting: shown beside the target, not instead of it
        ratio_goal(
            "same, with `listen.busy_poll_us: 200` (opt-in): p50 latency <= 1.4x NGINX",
            busy.p50_ms["c1"] / ngx.p50_ms["c1"] if ngx else None,
            lambda r: r <= 1.4,
            _per_run(run, "busypoll", "nginx", "c1", p50),
        )
    ratio_goal(
        "demo policies, 1 MiB bodies, 8 connections: MB/s >= 0.70x NGINX",
        demo.mib_s() / ngx.mib_s() if demo and ngx else None,
        lambda r: r >= 0.70,
        _per_run(run, "demo", "nginx", "c8_1m", rps),
    )
    text = "demo policies, 64 connections: p99 latency < 10 ms"
    if demo is None:
        found.append(Goal(text, "not measured", None))
    else:
        value = demo.p99_ms["c64"]
        runs = _runs_text(_per_run(run, "demo", None, "c64", p99), " ms")
        found.append(Goal(text, f"{value:.2f} ms", value < 10, runs))
    text = "1,000 routes: peak RSS < 50 MiB per worker"
    if many is None or many.rss_mib is None:
        found.append(Goal(text, "not measured", None))
    else:
        found.append(Goal(text, f"{many.rss_mib:.1f} MiB", many.rss_mib < 50))
    ratio_goal(
        "1,000 routes: req/s at 64 connections within 5% of 1 route",
        many.rps["c64"] / plain.rps["c64"] if many and plain else None,
        lambda r: r >= 0.95,
        _per_run(run, "routes1000", "plain", "c64", rps),
    )
    counted = run.instructions
    if "routes1000" in counted and "plain" in counted:
        # The same question asked of a count that does not drift with the machine.
        ratio_goal(
            "same, in instructions per request (callgrind, 1 connection): within 5%",
            counted["routes1000"] / counted["plain"],
            lambda r: r <= 1.05,
            [],
        )
    return found


# --- formatting ---------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or not reference or value != value:
        return ""
    return f" ({value / reference:.2f}x)"


COLUMNS = (
    "target",
    "req/s c1",
    "p50 c1 ms",
    "req/s c64",
    "p50 c64 ms",
    "p99 c64 ms",
    "MiB/s 1 MiB c8",
    "p99 1 MiB ms",
    "CPU µs/req c64",
    "CPU µs/req c1",
    "proxy CPU c64",
    "RSS at start MiB",
    "peak RSS MiB",
)


def _cell(value: float | None, reference: float | None, digits: int, with_ratio: bool) -> str:
    return _num(value, digits) + (_ratio(value, reference) if with_ratio else "")


def rows(by_name: dict[str, Summary]) -> list[list[str]]:
    """One row per target; strangler's cells carry their ratio to NGINX."""
    ref = by_name.get("nginx")
    found: list[list[str]] = []
    for name, s in by_name.items():
        has_r = ref is not None and name in STRANGLER
        r = ref if ref is not None and has_r else s
        busy = s.busy.get("c64")
        found.append(
            [
                LABELS.get(name, name) + (" ⚠" if s.failures else ""),
                _cell(s.rps.get("c1"), r.rps.get("c1"), 0, has_r),
                _cell(s.p50_ms.get("c1"), r.p50_ms.get("c1"), 3, has_r),
                _cell(s.rps.get("c64"), r.rps.get("c64"), 0, has_r),
                _cell(s.p50_ms.get("c64"), r.p50_ms.get("c64"), 2, has_r),
                _cell(s.p99_ms.get("c64"), r.p99_ms.get("c64"), 2, has_r),
                _cell(s.mib_s() if "c8_1m" in s.rps else None, r.mib_s(), 0, has_r),
                _cell(s.p99_ms.get("c8_1m"), r.p99_ms.get("c8_1m"), 1, has_r),
                _cell(s.cpu_us.get("c64"), r.cpu_us.get("c64"), 1, has_r),
                _cell(s.cpu_us.get("c1"), r.cpu_us.get("c1"), 1, has_r),
                "-" if busy is None else f"{busy * 100:.0f}%",
                _cell(s.rss_start_mib, r.rss_start_mib, 1, has_r),
                _cell(s.rss_mib, r.rss_mib, 1, has_r),
            ]
        )
    return found


def table(run: Run) -> str:
    """A plain-text table for the terminal."""
    lines = [list(COLUMNS), *rows(summaries(run))]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.append("")
    for goal in goals(run):
        text.append(f"{_verdict(goal):5} {goal.text}: {goal.measured}")
    return "\n".join(text)


def _verdict(goal: Goal) -> str:
    return "-" if goal.ok is None else ("pass" if goal.ok else "FAIL")


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def progress_line(run: int, load: str, target: str, sample: Sample) -> str:
    r = sample.result
    cpu = sample.cpu_us_per_request
    extra = f" cpu {cpu:6.1f} µs/req" if cpu is not None else ""
    bad = f" FAILED {r.non_2xx + r.socket_errors}" if r.non_2xx or r.socket_errors else ""
    return (
        f"run {run} {load:>6} {target:>10}: {r.rps:9.0f} req/s  p50 {r.p50_ms:7.3f} ms  "
        f"p99 {r.p99_ms:7.2f} ms{extra}  cpu0 other {sample.foreign_busy * 100:3.0f}%{bad}"
    )


def markdown(run: Run) -> str:
    by_name = summaries(run)
    a = run.args
    out = [
        "# Benchmark results",
        "",
        f"Generated by `{_invocation()}` (`make bench`) on {run.started:%Y-%m-%d %H:%M} UTC in "
        f"{run.elapsed_s / 60:.1f} min: {a.runs} run(s) of {a.duration:g} s per measurement, "
        "medians. The proxy under test (NGINX or strangler, one worker) is pinned to CPU "
        f"{PROXY_CPU}; wrk and the origin NGINX to CPU {CLIENT_CPU}. Ratios are to NGINX as "
        "a proxy in the same run. Where the time goes in strangler: "
        "[PROFILE.md](PROFILE.md).",
        "",
    ]
    out += _foundation(run)
    out += [
        "## Targets",
        "",
        "Medians, as ratios to NGINX measured in the same run; `each run` is the same ratio "
        "per run (run i of both targets was measured seconds apart): how far apart these "
        "are says how much to trust the median on this machine today.",
        "",
    ]
    out += _md_table(
        ["target", "measured", "each run", "result"],
        [[g.text, g.measured, g.runs or "-", _verdict(g)] for g in goals(run)],
    )
    out += [
        "",
        "## All numbers",
        "",
        f"Medians of {a.runs} run(s); strangler's cells carry their ratio to NGINX. "
        "`c1`/`c64`: 1 KiB bodies at 1 and 64 connections; `1 MiB c8`: 1 MiB bodies at 8 "
        "connections. CPU µs/req: the proxy's utime+stime (all its processes and threads, "
        "/proc/PID/stat) over the run divided by the requests served. proxy CPU: that CPU "
        "time over wall time (100% = the proxy's core was saturated). Peak RSS: VmHWM of "
        "the worker after all runs.",
        "",
    ]
    out += _md_table(list(COLUMNS), rows(by_name))
    failures = [n for n, s in by_name.items() if s.failures]
    if failures:
        out += ["", "⚠ non-2xx answers or socket errors in: " + ", ".join(failures)]
    out += _saturation(by_name)
    out += _instructions(run)
    out += _spread(run)
    out += _noise(run)
    out += _environment(run)
    out += ["", "## Commands", "", "```"] + run.commands + ["```"]
    out += _configs(run)
    return "\n".join(out) + "\n"


def _saturation(by_name: dict[str, Summary]) -> list[str]:
    """Was NGINX's core the limit at 64 connections? If not, wrk and the origin on the
    other core were, and NGINX could do more: req/s ratios to it flatter strangler, and
    the CPU µs per request ratio is the fairer comparison."""
    ngx = by_name.get("nginx")
    busy = ngx.busy.get("c64") if ngx is not None else None
    if ngx is None or busy is None or busy >= 0.9:
        return []
    others = [
        us for n, s in by_name.items() if n in STRANGLER and (us := s.cpu_us.get("c64")) is not None
    ]
    ref = ngx.cpu_us.get("c64")
    cost = ""
    if others and ref:
        low, high = f"{min(others) / ref:.0f}", f"{max(others) / ref:.0f}"
        times = low if low == high else f"{low}-{high}"
        cost = f" strangler spends {times}x NGINX's CPU per request."
    return [
        "",
        f"Note: at 64 connections NGINX kept its core only {busy * 100:.0f}% busy: wrk and the "
        "origin, sharing the other core, were the limit, so NGINX's req/s is a floor of what "
        "it can do and req/s ratios to it flatter strangler (whose core was saturated). CPU "
        "µs per request compares the two without that bias:" + (cost or " see its column."),
    ]


def _configs(run: Run) -> list[str]:
    out = ["", "## Generated configs", ""]
    for name, text in run.configs.items():
        out += [
            f"<details><summary>{name}</summary>",
            "",
            "```",
            text.strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    out.append(
        "The 1,000-route config is `strangler-plain.yaml` plus the routes that "
        "bench/strangler.py generates."
    )
    return out


def _invocation() -> str:
    args = " ".join(sys.argv[1:])
    return f"python bench/run.py {args}" if args else "python bench/run.py"


def _foundation(run: Run) -> list[str]:
    f = run.foundation
    if not f:
        return []
    direct, plain = f.get("direct"), f.get("plain")
    if direct is None or plain is None:
        return []
    return [
        "## Quick check: wrk -c64 through strangler vs directly",
        "",
        "1 KiB bodies, 64 connections, one wrk run each, same pinning as below; strangler "
        "with one worker and one plain route.",
        "",
        *_md_table(
            ["", "req/s", "p50 ms", "p99 ms"],
            [
                [
                    "directly against the origin (NGINX)",
                    _num(direct.rps),
                    _num(direct.p50_ms, 2),
                    _num(direct.p99_ms, 2),
                ],
                [
                    "through strangler, 1 worker",
                    _num(plain.rps) + _ratio(plain.rps, direct.rps) + " of direct",
                    _num(plain.p50_ms, 2),
                    _num(plain.p99_ms, 2),
                ],
            ],
        ),
        "",
    ]


def _instructions(run: Run) -> list[str]:
    counted = run.instructions
    if not counted:
        return []
    plain = counted.get("plain")
    out = [
        "",
        "## Instructions per request",
        "",
        "strangler's user-space instructions per request under valgrind's callgrind "
        "(`bench/instr.py`: 2,000 requests on 1 connection after a warm-up, the NGINX origin "
        "behind). The same code gives the same count within about 1% whatever else the "
        "machine does, so a change shows here when the timings above are lost in noise. Not "
        "counted: the kernel's work in our system calls, and cache misses.",
        "",
    ]
    body = [
        [
            LABELS.get(name, name),
            f"{value:,.0f}",
            f"{value / plain:.3f}x" if plain else "-",
        ]
        for name, value in counted.items()
    ]
    out += _md_table(["scenario", "instructions per request", "ratio to plain"], body)
    return out


def _spread(run: Run) -> list[str]:
    out = ["", "## Every run (req/s)", ""]
    body = []
    for t in run.targets:
        row = [LABELS.get(t.name, t.name)]
        for load in LOADS:
            values = [s.result.rps for s in t.samples.get(load.key, [])]
            if not values:
                row.append("-")
                continue
            mid = statistics.median(values)
            spread = (max(values) - min(values)) / mid * 100 if mid else 0.0
            row.append(" / ".join(f"{v:,.0f}" for v in values) + f" (±{spread / 2:.0f}%)")
        body.append(row)
    out += _md_table(["target", *(load.key for load in LOADS)], body)
    return out


def _noise(run: Run) -> list[str]:
    samples = [s for t in run.targets for ss in t.samples.values() for s in ss]
    foreign = sorted(s.foreign_busy * 100 for s in samples)
    client = sorted(s.cpu_busy.get(CLIENT_CPU, 0.0) * 100 for s in samples)
    b, e = run.load_before, run.load_after
    out = [
        "",
        "## How noisy the machine was",
        "",
        f"- load average (1/5/15 min) before: {b[0]:.2f} / {b[1]:.2f} / {b[2]:.2f}; "
        f"after: {e[0]:.2f} / {e[1]:.2f} / {e[2]:.2f}",
    ]
    if foreign:
        out.append(
            f"- CPU {PROXY_CPU} busy with work other than the proxy under test, per wrk run: "
            f"median {statistics.median(foreign):.0f}%, max {foreign[-1]:.0f}% (includes the "
            "loopback network's softirq time)"
        )
        out.append(
            f"- CPU {CLIENT_CPU} (wrk + origin) busy per wrk run: median "
            f"{statistics.median(client):.0f}%, max {client[-1]:.0f}%"
        )
    return out


def _environment(run: Run) -> list[str]:
    m, v = run.machine, run.versions
    return [
        "",
        "## Machine and versions",
        "",
        f"- machine: {m.get('nproc')} CPUs (`nproc`), {m.get('cpu')}, {m.get('memory')} RAM; "
        f"kernel {m.get('kernel')}; {m.get('os')}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- NGINX settings (bench/nginx.py): 1 worker_process each, access_log off; origin: "
        "sendfile, open_file_cache, keepalive_requests 1000000; proxy: upstream keepalive "
        "128, HTTP/1.1 upstream, X-Forwarded-For/-Proto and X-Request-ID set, "
        "proxy_buffering on with 8 x 64 KiB buffers, proxy_max_temp_file_size 0",
        "- strangler settings (bench/strangler.py): `--workers 1`, JSON access log on "
        "stderr into a file, Prometheus metrics on; scenarios as documented there; every "
        "request carries the sticky cookie of one returning user",
    ]
