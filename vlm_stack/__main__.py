"""``python -m vlm_stack up|down|status|logs`` for the local (no Docker) stack."""

from __future__ import annotations

import argparse
import sys

from vlm_stack.config import StackConfig
from vlm_stack.local import LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "logs"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for each service")
    parser.add_argument("--follow", "-f", action="store_true", help="logs: follow every log until Ctrl-C")
    parser.add_argument("--lines", "-n", type=int, default=None, help="logs: lines of each log (40; following: 10)")
    args = parser.parse_args(argv)
    if args.command != "logs" and (args.follow or args.lines is not None):
        parser.error("--follow and --lines go with logs")
    stack = LocalStack(StackConfig.from_env())
    if args.command == "up":
        try:
            stack.up(args.timeout)
        except BaseException:
            stack.down()
            raise
    elif args.command == "down":
        stack.down()
    elif args.command == "status":
        return 0 if stack.status() else 1
    else:
        if args.follow:
            return stack.logs_tail(10 if args.lines is None else args.lines, follow=True)
        return stack.logs_tail(40 if args.lines is None else args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
