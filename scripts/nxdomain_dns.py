"""A DNS server that knows no name: every query gets NXDOMAIN at once.

scripts/swarm_test.sh runs it as the upstream DNS of its swarm nodes, which have no network
beyond the test's own. Docker's embedded DNS answers the stack's own names and forwards the
rest upstream; with no upstream answering, each unknown name (a service before its first
task exists) costs its callers 20 s of retries.
"""

from __future__ import annotations

import socket
import sys


def refuse(query: bytes) -> bytes:
    """The query sent back as a response: QR set, recursion available, RCODE 3 (NXDOMAIN)."""
    flags = int.from_bytes(query[2:4], "big")
    flags = (flags | 0x8000 | 0x0080) & ~0x000F | 0x0003
    end = 12  # the question: its name's labels, then type and class (an EDNS record after it is dropped)
    while end < len(query) and query[end]:
        end += 1 + query[end]
    question = query[12 : end + 5]
    return query[:2] + flags.to_bytes(2, "big") + b"\0\1\0\0\0\0\0\0" + question


def main(address: str, port: int = 53) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    while True:
        query, sender = sock.recvfrom(4096)
        if len(query) >= 12:
            sock.sendto(refuse(query), sender)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 53)
