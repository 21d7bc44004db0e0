"""The /session relay's own cost: added latency, CPU and booking time under daphne and uvicorn.

Run with ``make bench`` (or ``PYTEST_ARGS='-k relay' make bench``). Three kinds of process on
loopback: the Realtime simulator alone (``python -m ducke.realtime.simulator.server``: no
Django, pace 1.0, events stamped with ``x_seq`` and a CLOCK_MONOTONIC send time), one relay per
ASGI server (``DUCKE_REALTIME_URL`` at the simulator, policies raised so nothing is refused or
cut off) and this process's load clients. The relay is pinned to one core and the simulator +
clients to the other (``os.sched_setaffinity``; with fewer than two cores nothing is pinned
and the run says so), so the figures are the relay's, not the harness's contention.

At each step N, N sessions go through the relay and, at the same time, up to 20 identical ones
straight to the simulator (the direct reference), all streaming real-time pcm16 audio (20-100
ms chunks) and receiving the spoken answers. Per server and step it prints: added latency per
audio delta = relayed minus direct (p50, p99); the direct reference itself; "answer" (end of
speech to the first answer delta, VAD silence included); relay CPU from /proc/<pid>/stat over
the steady phase, per session (% of a core per session-second of audio); booking
(``response.done`` -> the relay's ``quota.status``) p50/p99; the harness core's load.

Targets (printed with the figures, not asserted: the machine is shared): at 100 sessions p99
added <= 10 ms, relay CPU <= 0.45 % of a core per session, booking p99 <= 20 ms. The test FAILS
only on correctness: frames dropped or reordered (answer audio short of what was billed
included), or sessions without answers (could not connect, no answer, unfinished answer).
``RELAY_BENCH_STEPS=25,50,100`` (default) and ``RELAY_BENCH_SECONDS=10`` change the ramp; steps
above 100 run only for a server that met the target at the step before.
``RELAY_BENCH_SERVERS=daphne`` measures one server (default ``daphne,uvicorn``) and
``RELAY_BENCH_FLOORS=0`` skips the bare-relay floor. ``RELAY_BENCH_HARNESS_LOAD=0.6`` keeps that
share of the harness's core busy with a process of its own (a busy machine, reproducible on a
faster one: it shows in the harness core's "others%").
"""

import asyncio
import os

import pytest

from ducke.realtime.simulator.server import REALTIME_PATH
from tests.fixtures.relay_load import (
    cpu_split,
    pinned,
    run_step,
    simulator_url,
    start_app_server,
    start_busy_process,
    start_simulator_process,
)

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(900)]

STEPS = tuple(int(n) for n in os.environ.get("RELAY_BENCH_STEPS", "25,50,100").split(","))
STEADY_SECONDS = float(os.environ.get("RELAY_BENCH_SECONDS", "10"))
SERVERS = tuple(os.environ.get("RELAY_BENCH_SERVERS", "daphne,uvicorn").split(","))
# The floor at the target step: the bare relay peer, stock and (daphne) with DUCK-E's workarounds.
BARE_RELAY = "tests.benchmarks.peers.bare_relay:application"
WITH_WORKAROUNDS = "DUCK-E's workarounds"
FLOOR_VARIANTS = {"daphne": ("stock", WITH_WORKAROUNDS), "uvicorn": ("stock", WITH_WORKAROUNDS)}
FLOORS = os.environ.get("RELAY_BENCH_FLOORS", "1") != "0"
HARNESS_LOAD = float(os.environ.get("RELAY_BENCH_HARNESS_LOAD", "0"))
TARGET_SESSIONS = 100
TARGET_ADDED_P99_MS = 10.0
TARGET_CPU_PER_SESSION = 0.45  # % of one core per session
TARGET_BOOKING_P99_MS = 20.0
# The harness core this busy (by anyone) inflates the direct reference too: say so.
HARNESS_BUSY_PERCENT = 85.0


def meets_target(row):
    """The step's relayed sessions were held within target: p99 added and no frame lost."""
    return (
        row["added_p99"] <= TARGET_ADDED_P99_MS
        and row["late"] == 0
        and row["dropped"] == 0
        and row["reordered"] == 0
        and row["problems"] == 0
    )


def correctness_problems(server, step):
    """Frames dropped or reordered, sessions without answers: what fails the benchmark."""
    problems = []
    for session in step.sessions:
        where = f"{server} N={step.pairs} {session.mode} #{session.index}"
        if session.errors:
            problems.append(f"{where}: {session.errors[:3]}")
        if session.responses_done < 1:
            problems.append(f"{where}: no answer")
        if session.responses_done != session.responses_created:
            problems.append(f"{where}: unfinished answer")
        if session.responses_not_completed:
            problems.append(f"{where}: answer not completed")
        if session.audio_mismatches:
            problems.append(f"{where}: answer audio missing (frames dropped)")
        if session.dropped or session.reordered:
            problems.append(f"{where}: {session.dropped} dropped, {session.reordered} reordered")
    return problems


def others_on_relay_core(row):
    """% of the relay's core busy with anything but the relay (NaN when nothing is pinned)."""
    return row.get("cpu_relay_core", float("nan")) - row["cpu_relay"]


def others_on_harness_core(row):
    """% of the harness's core(s) busy with anything but the simulator and the clients."""
    return row.get("cpu_harness_core", float("nan")) - row["cpu_simulator"] - row["cpu_clients"]


def ratio(a, b):
    return a / b if b else float("nan")


def verdict(value, target):
    if value != value:  # NaN: not measured
        return "n/a"
    return "MET" if value <= target else "MISS"


def print_table(server, rows):
    print(f"\n{server} relay -> simulator (websockets), {STEADY_SECONDS:g} s steady phase per step")
    print(
        f"  {'N':>4} {'ref':>3} {'deltas':>6} | {'direct p50/p99':>15} | {'relayed p50/p99':>15} | "
        f"{'added p50/p99':>15} | {'answer added p50/p99':>20} | {'relay CPU%':>10} "
        f"{'%/session':>9} {'others%':>7} | {'sim CPU%':>8} {'client CPU%':>11} "
        f"{'others%':>7} {'lag p99':>7} | "
        f"{'dropped':>7} {'reordered':>9} {'late':>4} | {'booking p50/p99':>15} | within"
    )
    for r in rows:
        print(
            f"  {r['pairs']:>4} {r['direct_sessions']:>3} {r['deltas']:>6} | "
            f"{r['direct_p50']:>7.2f}/{r['direct_p99']:<7.2f} | "
            f"{r['relayed_p50']:>7.2f}/{r['relayed_p99']:<7.2f} | "
            f"{r['added_p50']:>7.2f}/{r['added_p99']:<7.2f} | "
            f"{r['answer_added_p50']:>9.1f}/{r['answer_added_p99']:<10.1f} | "
            f"{r['cpu_relay']:>10.1f} {r['cpu_relay_per_session']:>9.3f} "
            f"{others_on_relay_core(r):>7.1f} | "
            f"{r['cpu_simulator']:>8.1f} {r['cpu_clients']:>11.1f} "
            f"{others_on_harness_core(r):>7.1f} {r['loop_lag_p99']:>7.1f} | "
            f"{r['dropped']:>7} {r['reordered']:>9} {r['late']:>4} | "
            f"{r['booking_p50']:>7.1f}/{r['booking_p99']:<7.1f} | "
            f"{'yes' if meets_target(r) else 'no'}"
        )
    print(
        "  (ms; ref = direct reference sessions; CPU in % of one core, %/session = % of a core "
        "per session-second; others% = the rest of the relay's / the harness's core busy time "
        "(other processes on a shared machine, interrupts); lag p99 = the clients' event loop; "
        "late = relayed "
        "deltas over direct p50 + 100 ms; booking = "
        "response.done to the relay's quota.status; within = p99 added <= "
        f"{TARGET_ADDED_P99_MS:g} ms, nothing dropped, reordered or late)"
    )


def headline(server, rows):
    """The figures the issue asks for, at the target step, each with its target."""
    sustained = max((r["pairs"] for r in rows if meets_target(r)), default=0)
    at = next((r for r in rows if r["pairs"] == TARGET_SESSIONS), rows[-1] if rows else None)
    if at is None:
        return {}, [f"{server}: no step ran"]
    n = at["pairs"]
    harness = at["cpu_simulator"] + at["cpu_clients"]
    if others_on_harness_core(at) == others_on_harness_core(at):  # measured
        harness += others_on_harness_core(at)
    lines = [
        f"{server}:",
        f"  sessions held within target: {sustained} (target {TARGET_SESSIONS}: "
        f"{'MET' if sustained >= TARGET_SESSIONS else 'MISS'})",
        f"  p99 added latency per audio delta at N={n}: {at['added_p99']:.2f} ms "
        f"(p50 {at['added_p50']:.2f}; target <= {TARGET_ADDED_P99_MS:g}: "
        f"{verdict(at['added_p99'], TARGET_ADDED_P99_MS)})",
        f"  relay CPU per session-second at N={n}: {at['cpu_relay_per_session']:.3f} % of a core "
        f"({at['cpu_relay']:.1f} % in all; target <= {TARGET_CPU_PER_SESSION:g}: "
        f"{verdict(at['cpu_relay_per_session'], TARGET_CPU_PER_SESSION)})",
        f"  booking (response.done -> quota.status) at N={n}: p50 {at['booking_p50']:.1f} ms, "
        f"p99 {at['booking_p99']:.1f} ms (target p99 <= {TARGET_BOOKING_P99_MS:g}: "
        f"{verdict(at['booking_p99'], TARGET_BOOKING_P99_MS)})",
        f"  direct reference at N={n} ({at['direct_sessions']} sessions straight to the "
        f"simulator): p50 {at['direct_p50']:.2f} ms, p99 {at['direct_p99']:.2f} ms; relayed "
        f"p99 / direct p99 = {ratio(at['relayed_p99'], at['direct_p99']):.2f}",
        f"  cores at N={n}: relay {at['cpu_relay']:.0f} % + others "
        f"{others_on_relay_core(at):.0f} % of the relay's; simulator {at['cpu_simulator']:.0f} "
        f"% + clients {at['cpu_clients']:.0f} % + others {others_on_harness_core(at):.0f} % of "
        "the harness's"
        + (
            f" (over {HARNESS_BUSY_PERCENT:g} %: the reference is inflated too, read with care)"
            if harness > HARNESS_BUSY_PERCENT
            else ""
        ),
    ]
    return at, lines


def backing_services():
    """The relay's database and Redis: this run's ``DATABASE_URL`` / ``REDIS_URL`` when set
    (what a deployment uses), else the embedded defaults (a private SQLite file, in-process
    counters)."""
    return {
        name: os.environ[name] for name in ("DATABASE_URL", "REDIS_URL") if os.environ.get(name)
    }


def measure_step(split, upstream, simulator_pid, relay, server, pairs, problems):
    """One step of ``pairs`` sessions through ``relay``: its summary row (correctness
    problems appended to ``problems``)."""
    with pinned(split.harness):
        step = asyncio.run(
            run_step(
                upstream,
                f"{relay.ws_url}/session",
                relay.url,
                pairs,
                steady_seconds=STEADY_SECONDS,
                pids={"relay": relay.pid, "simulator": simulator_pid},
                cores={"relay_core": split.relay, "harness_core": split.harness},
            )
        )
    step_problems = correctness_problems(server, step)
    problems += step_problems
    row = step.summary()
    row["problems"] = len(step_problems)
    return row


def measure_floors(tmp_path, split, upstream, simulator_pid, pairs, problems):
    """The bare relay (tests/benchmarks/peers/bare_relay.py) under each server at ``pairs``
    sessions: stock, and with DUCK-E's workarounds (``ducke.server_workarounds``: the daphne
    ones are no-ops under uvicorn, the upstream client's apply to both).
    ``{(server, variant): row}``."""
    floors = {}
    for server in SERVERS:
        for variant in FLOOR_VARIANTS[server]:
            relay = start_app_server(
                tmp_path / f"floor-{server}-{variant}",
                server,
                cpus=split.relay,
                application=BARE_RELAY,
                BARE_RELAY_UPSTREAM=upstream,
                BARE_RELAY_WORKAROUNDS="1" if variant == WITH_WORKAROUNDS else "0",
            )
            try:
                floors[server, variant] = measure_step(
                    split, upstream, simulator_pid, relay, f"{server} {variant}", pairs, problems
                )
            finally:
                relay.stop()
    return floors


def print_floors(floors, rows, pairs):
    print(
        f"\nThe floor: a bare ASGI relay (no Django, Channels, quotas; frames piped as they came) "
        f"on the same server, N={pairs}"
    )
    print(
        f"  {'server':<8} {'relay':<36} | {'CPU %/session':>13} | {'added p50/p99':>15} | "
        f"{'DUCK-E / floor CPU':>18}"
    )
    for (server, variant), floor in floors.items():
        ducke = next((r for r in rows[server] if r["pairs"] == pairs), None)
        print(
            f"  {server:<8} {'bare, ' + variant:<36} | {floor['cpu_relay_per_session']:>13.3f} | "
            f"{floor['added_p50']:>7.2f}/{floor['added_p99']:<7.2f} | "
            + (
                f"{ratio(ducke['cpu_relay_per_session'], floor['cpu_relay_per_session']):>18.2f}"
                if ducke
                else f"{'n/a':>18}"
            )
        )


def test_relay_added_latency_cpu_and_frames(tmp_path, bench_report):
    load_before = os.getloadavg()[0]
    split = cpu_split()
    print(f"\nRelay benchmark: {split.describe()}")
    if HARNESS_LOAD:
        print(f"  the harness's core kept {HARNESS_LOAD:.0%} busy by a process of its own")
    simulator = start_simulator_process(tmp_path / "simulator", cpus=split.harness)
    harness_load = start_busy_process(split.harness, HARNESS_LOAD)
    upstream = simulator_url(simulator, REALTIME_PATH)
    relays = {}
    problems = []
    rows = {server: [] for server in SERVERS}
    floors = {}
    floor_step = TARGET_SESSIONS if TARGET_SESSIONS in STEPS else STEPS[-1]
    try:
        for server in SERVERS:
            relays[server] = start_app_server(
                tmp_path / server,
                server,
                cpus=split.relay,
                DUCKE_REALTIME_URL=upstream,
                DUCKE_SIMULATOR_ENABLED="0",
                **backing_services(),
            )
        for name, process in {**relays, "simulator": simulator}.items():
            print(f"  {name} pid {process.pid} on CPU {sorted(os.sched_getaffinity(process.pid))}")
        running = set(SERVERS)
        for pairs in STEPS:
            if pairs > TARGET_SESSIONS:  # beyond the target only where it was met
                running = {s for s in running if rows[s] and meets_target(rows[s][-1])}
            # Interleaved per step: both servers see the same machine load over the run.
            for server in sorted(running):
                rows[server].append(
                    measure_step(
                        split, upstream, simulator.pid, relays[server], server, pairs, problems
                    )
                )
            if pairs == floor_step and FLOORS:
                floors = measure_floors(tmp_path, split, upstream, simulator.pid, pairs, problems)
            if not running:
                break
    finally:
        for relay in relays.values():
            relay.stop()
        simulator.stop()
        if harness_load is not None:
            harness_load.kill()
            harness_load.wait(10)
    print(
        f"\nRelay benchmark: {os.cpu_count()} cores, load average before the run "
        f"{load_before:.2f}; {split.describe()}; N = relayed sessions, ref = direct ones at "
        "the same time"
    )
    for server in SERVERS:
        print_table(server, rows[server])
    if floors:
        print_floors(floors, rows, floor_step)
    print()
    at_target = {}
    for server in SERVERS:
        at_target[server], lines = headline(server, rows[server])
        print("\n".join(lines))
    daphne, uvicorn = at_target.get("daphne"), at_target.get("uvicorn")  # one may be off
    if daphne and uvicorn:
        print(
            f"daphne / uvicorn at N={daphne['pairs']}: p99 added "
            f"{ratio(daphne['added_p99'], uvicorn['added_p99']):.2f}, relay CPU per session "
            f"{ratio(daphne['cpu_relay_per_session'], uvicorn['cpu_relay_per_session']):.2f}, "
            f"booking p99 {ratio(daphne['booking_p99'], uvicorn['booking_p99']):.2f}"
        )
    for server in SERVERS:
        at = at_target[server]
        if at:
            n = at["pairs"]
            bench_report(
                f"relay p99 added latency per delta, {n} sessions ({server})",
                at["added_p99"],
                unit="ms",
                target=f"<= {TARGET_ADDED_P99_MS:g}",
            )
            bench_report(
                f"relay CPU per session-second, {n} sessions ({server})",
                at["cpu_relay_per_session"],
                unit="%core",
                target=f"<= {TARGET_CPU_PER_SESSION:g}",
            )
            bench_report(
                f"booking p99, {n} sessions ({server})",
                at["booking_p99"],
                unit="ms",
                target=f"<= {TARGET_BOOKING_P99_MS:g}",
            )
            bench_report(f"direct reference p99, {n} sessions ({server})", at["direct_p99"])
        for (floor_server, variant), floor in floors.items():
            ducke = next((r for r in rows[server] if r["pairs"] == floor_step), None)
            if floor_server == server and ducke:
                bench_report(
                    f"bare relay CPU per session-second, {floor_step} sessions ({server}, "
                    f"{variant})",
                    floor["cpu_relay_per_session"],
                    unit="%core",
                    ratio=ratio(ducke["cpu_relay_per_session"], floor["cpu_relay_per_session"]),
                )
        sustained = [r["pairs"] for r in rows[server] if meets_target(r)]
        bench_report(f"relay sessions within target ({server})", max(sustained, default=0))
        dropped = sum(r.get("dropped", 0) + r.get("reordered", 0) for r in rows[server])
        bench_report(f"relay frames dropped or reordered ({server})", dropped, target="<= 0")
    if problems:
        direct = sum(" direct #" in p for p in problems)
        note = (
            f"\n({direct} of these concern direct sessions, which bypass the relay: the harness "
            "or the machine was starved too)"
            if direct
            else ""
        )
        pytest.fail("\n".join(problems[:20]) + note, pytrace=False)
