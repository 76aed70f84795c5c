"""``make logs`` for the local stack: every service's log under ``.run/logs/``, the one a
person reads first first (the service, Triton, nginx, Prometheus, then the others), nginx's
JSON access lines as one short line each; ``--follow`` (``make logs FOLLOW=1``) then prints
what each log gains, each line prefixed with its service, as ``docker compose logs -f`` does.

The files themselves are left as they are (nginx's access log stays JSON, for tools).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# the order of the services: a file's name (less ``.log``) is one of these or starts with one and "-"
ORDER = ("fastapi", "triton", "nginx", "nginx-error", "nginx-access", "prometheus")
LAST = ("supervisord",)
MAX_PATH = 100  # an access line's path longer than this is cut (with "…")


def order_key(path: Path) -> tuple[int, str, int]:
    """The sort key of a log file: its service's rank, then replicas by number (triton, triton-1, …)."""
    name = path.name.removesuffix(".log")
    for rank, service in enumerate(ORDER):
        replica = re.fullmatch(re.escape(service) + r"(?:-(\d+))?", name)
        if replica:
            return rank, service, int(replica.group(1) or 0)
    return len(ORDER) + (name in LAST), name, 0


def log_files(folder: Path) -> list[Path]:
    """The ``*.log`` files of ``folder``, in the order a person reads them."""
    return sorted(folder.glob("*.log"), key=order_key) if folder.is_dir() else []


def printable(text: str) -> str:
    """``text`` with every character a terminal would not print as itself replaced by ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def short_access_line(line: str) -> str:
    """nginx's JSON access line (``log_format vlm_json``) as ``time method path status
    request-time request-id`` (the order of the service's own lines); any other line as it is."""
    text = line.strip()
    if not text.startswith("{"):
        return line
    try:
        entry = json.loads(text)
    except ValueError:
        return line
    if not isinstance(entry, dict) or "status" not in entry:
        return line
    when = str(entry.get("time", "")).replace("T", " ")[:19]  # 2024-05-01T12:00:03+00:00
    path = printable(str(entry.get("uri", "")).partition("?")[0])  # no query string, as the service's lines
    if len(path) > MAX_PATH:
        path = path[: MAX_PATH - 1] + "…"
    seconds = entry.get("request_time")  # seconds, to the millisecond
    took = f"{seconds * 1000:.0f}ms" if isinstance(seconds, int | float) else "-"
    fields = [when, str(entry.get("method", "-")), path, str(entry.get("status", "-")), took]
    if entry.get("request_id"):
        fields.append(f"id={printable(str(entry['request_id']))}")
    return " ".join(fields)


def readable(path: Path, line: str) -> str:
    """A log line as ``make logs`` shows it."""
    return short_access_line(line) if path.name == "nginx-access.log" else line


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path``, made readable."""
    return last_lines(path, path.read_bytes(), lines)


def last_lines(path: Path, data: bytes, lines: int) -> list[str]:
    """The last ``lines`` whole lines of ``data`` (a log's bytes), made readable. Lines end at
    ``\n`` only: ``str.splitlines`` would also cut at characters a client can put in a log."""
    text = data.decode(errors="replace").removesuffix("\n")
    return [readable(path, line) for line in text.split("\n")[-lines:]] if lines > 0 and text else []


def print_tail(folder: Path, lines: int = 40, out=None) -> None:
    """Each log's last lines under a ``==> path <==`` header, in reading order."""
    out = out or sys.stdout
    files = log_files(folder)
    if not files:
        print(f"no logs in {folder}: the local stack has not run here (make demo, make up)", file=out)
    for path in files:
        shown = tail(path, lines)
        print(f"==> {path} <=={'' if shown else ' (empty)'}", file=out)
        for line in shown:
            print(line, file=out)


@dataclass
class _Position:
    offset: int
    inode: int
    partial: bytes = b""


class Follower:
    """What the logs of a folder gain, file by file, prefixed with their service's name.

    A file that appears later is followed from its start; one that shrinks or is replaced
    (supervisord rotates at 20 MB) is read again from its start."""

    def __init__(self, folder: Path, lines: int = 10):
        self.folder, self.lines = folder, lines
        self.positions: dict[Path, _Position] = {}
        self.width = 0

    def prefix(self, path: Path) -> str:
        name = path.name.removesuffix(".log")
        self.width = max(self.width, len(name))
        return f"{name:<{self.width}} | "

    def start(self) -> list[str]:
        """The last ``lines`` of every log now there, prefixed, in reading order."""
        files = log_files(self.folder)
        self.width = max((len(p.name.removesuffix(".log")) for p in files), default=0)
        shown = []
        for path in files:
            try:
                with path.open("rb") as handle:  # the size and the text from one handle: no line twice
                    stat = os.fstat(handle.fileno())
                    data = handle.read(stat.st_size)
            except OSError:
                continue
            shown += [self.prefix(path) + line for line in last_lines(path, data, self.lines)]
            self.positions[path] = _Position(stat.st_size, stat.st_ino)
        return shown

    def poll(self) -> list[str]:
        """The whole lines each log gained since the last call (a line still being written waits)."""
        shown = []
        for path in log_files(self.folder):
            try:
                stat = path.stat()
            except OSError:
                continue
            position = self.positions.get(path)
            if position is None or stat.st_ino != position.inode or stat.st_size < position.offset:
                position = self.positions[path] = _Position(0, stat.st_ino)
            if stat.st_size == position.offset:
                continue
            try:
                with path.open("rb") as handle:
                    handle.seek(position.offset)
                    data = handle.read()
            except OSError:
                continue
            position.offset += len(data)
            *complete, position.partial = (position.partial + data).split(b"\n")  # a character split
            # between two reads is whole again before it is decoded
            shown += [self.prefix(path) + readable(path, line.decode(errors="replace")) for line in complete]
        return shown


def follow(
    folder: Path, lines: int = 10, interval_s: float = 0.25, out=None, keep_going: Callable[[], bool] = lambda: True
) -> int:
    """Print the logs' last lines, then what they gain, until Ctrl-C (exit status 0)."""
    out = out or sys.stdout
    follower = Follower(folder, lines)
    try:
        for line in follower.start():
            print(line, file=out)
        print(f"[logs] following {folder} (Ctrl-C stops)", file=out, flush=True)
        while keep_going():
            batch = follower.poll()
            for line in batch:
                print(line, file=out)
            if batch:
                out.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # make logs FOLLOW=1 | head: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return 0
