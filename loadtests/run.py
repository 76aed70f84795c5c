"""Run a headless locust load test, write its reports and a summary, check the SLOs.

    python -m loadtests.run                       # settings from the environment (see config.py)
    HOST=http://127.0.0.1:8088 USERS=16 DURATION=60s PROFILE=mixed python -m loadtests.run
    python -m loadtests.run --users 4 --duration 10s --profile stream --slo-ttft-p95-ms 500
    python -m loadtests.run --ui                  # locust's web UI on http://127.0.0.1:8089

Writes into ``RESULTS_DIR`` (default ``loadtests/results/<timestamp>/``): ``report.html``
(locust's report), ``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``,
``locust_exceptions.csv``, ``summary.md`` (every table), ``summary.json``, ``samples.json``
(every sample) and ``locust.log`` / ``locust-console.txt``. Prints how long it runs first, and
at the end the figures read first (per model and in total: requests/s, TTFT p50/p95, output
tokens/s, failures) in 80 columns, then the path of summary.md on the last line.

Exit status: 0 when every configured SLO holds; 1 when one is broken (each named, measured
against its threshold); 2 when the run itself failed (bad settings, locust crashed, no
request answered, an exception in the user code).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadtests.config import PROFILES, ConfigError, Settings
from loadtests.summary import SLO_NAMES, brief, check_slos, markdown, slo_thresholds, summarise

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCUSTFILE = HERE / "locustfile.py"

# flag -> environment variable (flags win over the environment)
FLAGS = {
    "host": "HOST",
    "users": "USERS",
    "spawn_rate": "SPAWN_RATE",
    "duration": "DURATION",
    "profile": "PROFILE",
    "models": "MODELS",
    "max_tokens": "MAX_TOKENS",
    "weights": "WEIGHTS",
    "chat_turns": "CHAT_TURNS",
    "image_sizes": "IMAGE_SIZES",
    "image_formats": "IMAGE_FORMATS",
    "wait": "WAIT",
    "request_timeout": "REQUEST_TIMEOUT",
    "stop_timeout": "STOP_TIMEOUT",
    "results_dir": "RESULTS_DIR",
    **{name.lower(): name for name in SLO_NAMES},  # --slo-p95-ms -> SLO_P95_MS
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description="Load test vlm-serve through nginx with locust; flags override the environment variables "
        "of the same name (HOST, USERS, SPAWN_RATE, DURATION, PROFILE, MODELS, MAX_TOKENS, WEIGHTS, RESULTS_DIR, "
        "SLO_*).",
    )
    parser.add_argument("--host", help="gateway URL (HOST, default http://localhost)")
    parser.add_argument("--users", "-u", help="simulated users (USERS, default 16)")
    parser.add_argument("--spawn-rate", "-r", help="users started per second (SPAWN_RATE, default 4)")
    parser.add_argument("--duration", "-t", help="e.g. 60s, 5m (DURATION, default 60s)")
    parser.add_argument("--profile", choices=list(PROFILES), help="PROFILE, default mixed")
    parser.add_argument("--models", help="comma separated (MODELS, default all four)")
    parser.add_argument("--max-tokens", help="MAX_TOKENS, default 32")
    parser.add_argument("--weights", help="mixed profile: infer=1,stream=1,chat=1 (WEIGHTS)")
    parser.add_argument("--chat-turns", help="turns per REST conversation (CHAT_TURNS, default 3)")
    parser.add_argument("--image-sizes", help="IMAGE_SIZES, default 64x48,320x240,1024x768")
    parser.add_argument("--image-formats", help="IMAGE_FORMATS, default PNG,JPEG,WEBP")
    parser.add_argument("--wait", help="seconds between a user's requests, 0.5 or 0.5-2 (WAIT, default 0)")
    parser.add_argument("--request-timeout", help="seconds (REQUEST_TIMEOUT, default 300)")
    parser.add_argument("--stop-timeout", help="seconds to finish requests in flight at the end (default 30)")
    parser.add_argument("--results-dir", help="RESULTS_DIR, default loadtests/results/<timestamp>")
    for name, meaning in SLO_NAMES.items():
        parser.add_argument("--" + name.lower().replace("_", "-"), help=f"{name}: {meaning}")
    parser.add_argument("--ui", action="store_true", help="open locust's web UI instead of a headless run")
    parser.add_argument("--web-host", default=os.environ.get("LOCUST_WEB_HOST", "127.0.0.1"))
    parser.add_argument("--web-port", default=os.environ.get("LOCUST_WEB_PORT", "8089"))
    parser.add_argument("--verbose", "-v", action="store_true", help="show locust's own output while it runs")
    return parser.parse_args(argv)


def environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    for flag, name in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            env[name] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def locust_command(settings: Settings, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--host",
        settings.host,
        "--users",
        str(settings.users),
        "--spawn-rate",
        str(settings.spawn_rate),
        *extra,
        *PROFILES[settings.profile],
    ]


class Terminated(Exception):
    """SIGTERM reached the runner."""


def _terminated(signum, frame):
    raise Terminated()


def _stop(proc: subprocess.Popen, timeout_s: float, already_signalled: bool) -> int | None:
    """Let locust finish (SIGTERM unless it got Ctrl-C already); kill it after ``timeout_s``."""
    try:
        if already_signalled:
            try:
                return proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        proc.terminate()
        return proc.wait(timeout=timeout_s)
    except (KeyboardInterrupt, Terminated, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
        return None


def run_headless(settings: Settings, env: dict[str, str], verbose: bool) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = Path(env.get("RESULTS_DIR") or HERE / "results" / stamp).resolve()
    results.mkdir(parents=True, exist_ok=True)
    samples_path = results / "samples.json"
    samples_path.unlink(missing_ok=True)
    env = {**env, "LOADTEST_SAMPLES": str(samples_path), "LOADTEST_CSV_PREFIX": str(results / "locust")}
    seconds = max(1, math.ceil(settings.duration_s))
    command = locust_command(
        settings,
        [
            "--headless",
            "--run-time",
            f"{seconds}s",
            "--stop-timeout",
            str(max(0, math.ceil(settings.stop_timeout_s))),
            "--csv",
            str(results / "locust"),
            "--html",
            str(results / "report.html"),
            "--only-summary",
            "--exit-code-on-error",
            "0",  # failures are judged here, against the SLOs
            "--logfile",
            str(results / "locust.log"),
        ],
    )
    print(start_line(settings, seconds), flush=True)
    print(
        f"[loadtest] {settings.profile} profile, +{settings.spawn_rate:g} users/s, max_tokens {settings.max_tokens}, "
        f"models {', '.join(settings.models)}",
        flush=True,
    )
    print(f"[loadtest] results in {results}", flush=True)
    console = results / "locust-console.txt"
    limit = seconds + settings.stop_timeout_s + 120
    interrupted = False
    with console.open("w") as out:
        output = {} if verbose else {"stdout": out, "stderr": subprocess.STDOUT}
        proc = subprocess.Popen(command, cwd=ROOT, env=env, **output)
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            returncode = proc.wait(timeout=limit)
        except (KeyboardInterrupt, Terminated) as exc:
            # locust stops its users and writes its reports on SIGTERM (Ctrl-C in a terminal
            # reaches it directly); the summary then covers the time until the interruption
            print("[loadtest] interrupted: waiting for locust's reports", file=sys.stderr, flush=True)
            interrupted = True
            returncode = _stop(proc, settings.stop_timeout_s + 30, already_signalled=isinstance(exc, KeyboardInterrupt))
            if returncode is None:
                return 130
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"[loadtest] locust did not finish within {limit:.0f}s", file=sys.stderr)
            return 2
        finally:
            signal.signal(signal.SIGTERM, previous)
    if returncode != 0 or not samples_path.exists():
        tail = console.read_text()[-3000:] if console.exists() else ""
        print(f"[loadtest] locust failed (exit {returncode}); see {console}\n{tail}", file=sys.stderr)
        return 2

    return finish(results, json.loads(samples_path.read_text()), env, settings.host, command, interrupted)


def start_line(settings: Settings, seconds: int) -> str:
    """What a person wants to know before waiting: how long, how many users, against what."""
    minutes = f" ({seconds / 60:.3g} min)" if seconds >= 120 else ""
    who = f"{settings.users} users against {settings.host}"
    return f"[loadtest] running {seconds} s{minutes} with {who}; Ctrl-C stops early"


def finish(results: Path, samples: dict, env: dict[str, str], host: str, command: list[str], interrupted: bool) -> int:
    """The summary of a run's samples: summary.md (every table) and summary.json written,
    the brief block printed (per model and in total, 80 columns), the SLOs judged; the
    last line printed names summary.md. Returns the exit status."""
    summary = summarise(samples)
    thresholds = slo_thresholds(env)
    violations = check_slos(summary, thresholds)
    exceptions = samples.get("exceptions", [])
    summary["run"]["locust_command"] = command[1:]
    summary["slo"] = {
        "thresholds": thresholds,
        "violations": [v.as_dict() for v in violations],
        "passed": not violations,
    }
    summary["exceptions"] = exceptions
    (results / "summary.md").write_text(markdown(summary, violations, thresholds))
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print("\n".join(brief(summary)), flush=True)

    def problem(message: str) -> None:
        print(f"[loadtest] {message}", file=sys.stderr, flush=True)

    code = 0
    if exceptions:
        for row in exceptions:
            problem(f"the user code raised {row['count']} x {row['message']}")
        code = 2
    elif summary["total"]["requests"] == 0:
        problem("no request was made: is the host up?")
        code = 2
    else:
        if summary["total"]["failures"] == summary["total"]["requests"]:
            problem(f"every request failed: is {host} the gateway, and is the stack up?")
        if interrupted:
            problem("the run was interrupted: the summary covers the time until then")
            code = 130
        elif violations:
            for violation in violations:
                problem(violation.message)
            problem(f"FAILED: {len(violations)} SLO violation(s)")
            code = 1
        elif thresholds:
            print("[loadtest] SLOs met: " + ", ".join(f"{k}={v:g}" for k, v in thresholds.items()), flush=True)
    if (results / "report.html").exists():
        print(f"[loadtest] locust's report: {results / 'report.html'}")
    print(f"[loadtest] every table (per endpoint and model, p99, ITL): {results / 'summary.md'}", flush=True)
    return code


def run_ui(settings: Settings, env: dict[str, str], web_host: str, web_port: str) -> int:
    command = locust_command(settings, ["--web-host", web_host, "--web-port", str(web_port), "--class-picker"])
    print(f"[loadtest] locust web UI on http://{web_host}:{web_port}/ (Ctrl-C to stop)", flush=True)
    os.chdir(ROOT)
    os.execve(command[0], command, env)  # locust takes this process's place (signals reach it)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args)
    try:
        settings = Settings.from_env(env)
        slo_thresholds(env)  # refuse bad thresholds before spending the run
    except ConfigError as exc:
        print(f"[loadtest] {exc}", file=sys.stderr)
        return 2
    if args.ui:
        return run_ui(settings, env, args.web_host, args.web_port)
    return run_headless(settings, env, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
