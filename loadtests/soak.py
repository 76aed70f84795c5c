"""``make soak``: the mixed locust load for ``DURATION`` (10m) on a local stack of its own,
with a fault injected on a schedule: a model's stub killed, the service killed,
tritonserver killed, nginx reloaded. Then a report (``soak.md``, ``soak.json``):

- requests sent, and errors outside the fault windows (which must be 0); a stub that dies
  by itself (the watchdog says so in its log) is listed as an unplanned fault, and the errors
  while the watchdog heals it are counted apart;
- each fault's recovery time (until ``/health/ready`` through nginx is 200 again);
- RSS and open file descriptors of every service (its whole process tree) at the start
  and at the end.

    python -m loadtests.soak --duration 10m --users 8
    DURATION=60s make soak

Exit status: 0 when no request failed outside a fault window and every fault recovered;
1 otherwise; 2 when the stack or locust could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from loadtests.config import parse_duration
from vlm_stack.procs import ephemeral_stack_env
from vlm_stack.supervisor import Supervisor
from vlm_triton.serve import children, stub_processes

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 5.0  # after readiness is back, requests already in flight may still fail


@dataclass
class Fault:
    name: str
    at: float = 0.0  # wall time
    recovered_after_s: float | None = None
    not_ready_seen: bool = False


@dataclass
class Report:
    duration_s: float
    users: int
    profile: str = "mixed"
    requests: int = 0
    failures: int = 0
    failures_outside_windows: list = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    # stubs that died by themselves and that the watchdog reloaded: [model, died at, reloaded at]
    unplanned: list = field(default_factory=list)
    failures_in_unplanned: int = 0
    resources: dict = field(default_factory=dict)


WATCHDOG_LINE = re.compile(r"^(\S+ \S+) vlm_triton\.serve WARNING model (\S+): (stub process .* died|reloaded in)")


def watchdog_events(log: Path) -> list[tuple[str, float, str]]:
    """(model, wall time, "died" | "reloaded") from vlm_triton.serve's log lines."""
    events = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        match = WATCHDOG_LINE.match(line)
        if match:
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((match[2], when, "died" if "died" in match[3] else "reloaded"))
    return events


def unplanned_faults(events: list[tuple[str, float, str]], planned: list[Fault]) -> list[list]:
    """Stub deaths the soak did not cause (none near an injected fault), with their reload."""
    found = []
    for model, when, kind in events:
        if kind != "died" or any(f.at - 1 <= when <= f.at + (f.recovered_after_s or 0) + GRACE_S for f in planned):
            continue
        reloaded = next((t for m, t, k in events if m == model and k == "reloaded" and t >= when), None)
        found.append([model, when, reloaded])
    return found


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += children(current)
    return pids


def usage(pid: int) -> tuple[int, int, int]:
    """RSS (MiB) and open files of ``pid``'s whole tree, and its process count."""
    rss_kb = fds = count = 0
    for p in tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss_kb += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            fds += len(os.listdir(f"/proc/{p}/fd"))
            count += 1
        except (OSError, StopIteration, ValueError):
            pass
    return rss_kb // 1024, fds, count


class Soak:
    def __init__(self, run_dir: Path, models_dir: Path, out: Path):
        self.env = {**ephemeral_stack_env(run_dir, models_dir), "VLM_STACK_MODE": "local"}
        self.run_dir, self.out = run_dir, out
        self.url = f"http://127.0.0.1:{self.env['NGINX_PORT']}"
        self.supervisor = Supervisor(run_dir)

    def stack(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["./triton_start.sh", command], cwd=ROOT, env=self.env, text=True, capture_output=True)

    def resources(self) -> dict[str, dict]:
        found = {}
        for name in ("triton", "fastapi", "nginx", "nginx-exporter", "prometheus"):
            pid = self.supervisor.pid(name)
            if pid:
                rss, fds, count = usage(pid)
                found[name] = {"pid": pid, "rss_mib": rss, "open_files": fds, "processes": count}
        return found

    def _tritonserver(self) -> int:
        return next(p for p in children(self.supervisor.pid("triton")) if "tritonserver" in _comm(p))

    # -- the faults
    def kill_stub(self) -> None:
        stubs = stub_processes(self._tritonserver())
        os.kill(next(pid for pid, model in stubs.items() if model == "llava_stream"), signal.SIGKILL)

    def kill_service(self) -> None:
        os.kill(self.supervisor.pid("fastapi"), signal.SIGKILL)

    def kill_tritonserver(self) -> None:
        os.kill(self._tritonserver(), signal.SIGKILL)

    def reload_nginx(self) -> None:
        self.supervisor.rpc().signalProcess("nginx", "HUP")

    def inject(self, fault: Fault, action, kills: bool, limit_s: float = 240) -> None:
        """Run ``action``; when it ``kills`` a process, wait until the stack says "not ready"
        (it must notice: a kill it never notices stays ``not_ready_seen=False``), then until it
        is ready again. Waits on what the stack says, not on a timer, however fast it recovers."""
        fault.at = time.time()
        action()
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            try:
                ok = httpx.get(self.url + "/health/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            fault.not_ready_seen |= not ok
            if ok and (fault.not_ready_seen or not kills):
                fault.recovered_after_s = round(time.monotonic() - started, 1)
                return
            time.sleep(0.1)

    def run(self, duration_s: float, users: int, profile: str = "mixed", faults: bool = True) -> Report:
        report = Report(duration_s, users, profile)
        began = time.time()
        report.resources["start"] = self.resources()
        samples = self.out / "locust" / "samples.json"
        locust = subprocess.Popen(
            [
                sys.executable, "-m", "loadtests.run",
                "--host", self.url, "--users", str(users), "--spawn-rate", str(users),
                "--duration", f"{int(duration_s)}s", "--profile", profile, "--max-tokens", "16",
            ],
            cwd=ROOT,
            env={**self.env, "RESULTS_DIR": str(self.out / "locust"), "WAIT": "0.2-1.0"},
            stdout=(self.out / "locust-console.txt").open("w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        schedule = (
            [
                ("model stub killed (llava_stream)", self.kill_stub, True),
                ("service killed", self.kill_service, True),
                ("tritonserver killed", self.kill_tritonserver, True),
                ("nginx reloaded", self.reload_nginx, False),
            ]
            if faults
            else []
        )
        started = time.monotonic()
        for i, (name, action, kills) in enumerate(schedule, start=1):
            time.sleep(max(0.0, started + duration_s * i / (len(schedule) + 1) - time.monotonic()))
            fault = Fault(name)
            report.faults.append(fault)
            self.inject(fault, action, kills)
            print(f"[soak] {name}: ready again after {fault.recovered_after_s} s", flush=True)
        code = locust.wait(timeout=duration_s + 300)
        report.resources["end"] = self.resources()
        if code == 2 or not samples.exists():
            raise SystemExit(f"locust failed (exit {code}); see {self.out / 'locust-console.txt'}")
        document = json.loads(samples.read_text())
        entries = document["entries"]
        report.requests = sum(len(e["times_ms"]) + e["failures"] for e in entries)
        report.failures = sum(e["failures"] for e in entries)
        windows = [(f.at, f.at + (f.recovered_after_s or 240) + GRACE_S) for f in report.faults]
        events = [e for e in watchdog_events(self.run_dir / "logs" / "triton.log") if e[1] >= began]  # this run's
        report.unplanned = unplanned_faults(events, report.faults)
        healed = [(died - GRACE_S, (reloaded or died) + GRACE_S) for _, died, reloaded in report.unplanned if reloaded]
        failures = [f for f in document.get("failures_at", []) if not any(a <= f[0] <= b for a, b in windows)]
        report.failures_outside_windows = [f for f in failures if not any(a <= f[0] <= b for a, b in healed)]
        report.failures_in_unplanned = len(failures) - len(report.failures_outside_windows)
        return report


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def markdown(report: Report) -> str:
    lines = [
        f"# Soak: {report.duration_s:.0f} s, {report.users} users, {report.profile} profile",
        "",
        f"- requests sent: {report.requests}",
        f"- failed: {report.failures}, of which outside the fault windows: {len(report.failures_outside_windows)}",
        "",
        "| fault | at (s) | ready again after (s) | not ready seen |",
        "|---|---|---|---|",
    ]
    first = report.faults[0].at if report.faults else 0.0
    for fault in report.faults:
        lines.append(f"| {fault.name} | {fault.at - first:.0f} | {fault.recovered_after_s} | {fault.not_ready_seen} |")
    for model, died, reloaded in report.unplanned:
        back = f"reloaded by the watchdog {reloaded - died:.1f} s later" if reloaded else "NOT reloaded"
        lines.append(f"- unplanned: {model}'s stub died by itself at {died - first:.0f} s, {back}")
    if report.unplanned:
        lines.append(f"- failed during those unplanned faults: {report.failures_in_unplanned}")
    lines += [
        "",
        "| service | RSS start (MiB) | RSS end (MiB) | open files start | open files end |",
        "|---|---|---|---|---|",
    ]
    start, end = report.resources.get("start", {}), report.resources.get("end", {})
    for name in start:
        a, b = start[name], end.get(name, {})
        lines.append(f"| {name} | {a['rss_mib']} | {b.get('rss_mib')} | {a['open_files']} | {b.get('open_files')} |")
    for failure in report.failures_outside_windows[:20]:
        lines.append(f"- outside a window: {failure}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default=os.environ.get("DURATION") or "10m", help="e.g. 60s, 10m")
    parser.add_argument("--users", type=int, default=int(os.environ.get("USERS") or 8))
    parser.add_argument(
        "--profile", default=os.environ.get("PROFILE") or "mixed", help="locust profile: mixed, infer, ..."
    )
    parser.add_argument(
        "--no-faults", action="store_true", help="inject nothing: any stub death or failed request fails the soak"
    )
    parser.add_argument(
        "--models-dir", type=Path, default=Path(os.environ.get("VLM_MODELS_DIR") or ROOT / ".models/tiny")
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    args = parser.parse_args(argv)
    duration_s = parse_duration(args.duration)
    args.out.mkdir(parents=True, exist_ok=True)
    soak = Soak(args.out / "stack", args.models_dir.resolve(), args.out)
    up = soak.stack("up")
    (args.out / "stack-up.log").write_text(up.stdout + up.stderr)
    if up.returncode != 0:
        print(up.stdout[-2000:], up.stderr[-2000:], file=sys.stderr)
        return 2
    try:
        report = soak.run(duration_s, args.users, args.profile, faults=not args.no_faults)
    finally:
        soak.stack("down")
    (args.out / "soak.json").write_text(json.dumps(asdict(report), indent=1))
    text = markdown(report)
    (args.out / "soak.md").write_text(text)
    print(text)
    healed = all(f.recovered_after_s is not None for f in report.faults)
    quiet = not args.no_faults or not report.unplanned  # without faults, a stub death fails the soak
    return 0 if healed and quiet and not report.failures_outside_windows else 1


if __name__ == "__main__":
    sys.exit(main())
