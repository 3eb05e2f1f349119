"""Fail with one clear line unless PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379)
answer: CI's machines run both as local services for the ledger and cluster tests."""

from __future__ import annotations

import socket
import sys

TIMEOUT = 5.0


def _exchange(port: int, request: bytes, size: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        return sock.recv(size)


def postgres_answers() -> bool:
    # An SSLRequest: any PostgreSQL server answers it with one byte, "S" or "N".
    return _exchange(5432, b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 1) in (b"S", b"N")


def redis_answers() -> bool:
    return _exchange(6379, b"PING\r\n", 64).startswith(b"+PONG")


def main() -> int:
    problems = []
    for name, address, check in (
        ("PostgreSQL", "127.0.0.1:5432", postgres_answers),
        ("Redis", "127.0.0.1:6379", redis_answers),
    ):
        try:
            ok = check()
        except OSError as exc:
            ok, why = False, str(exc)
        else:
            why = "unexpected answer"
        if not ok:
            problems.append(f"{name} at {address} does not answer ({why})")
    if problems:
        print("services: " + "; ".join(problems) + " - the ledger and cluster tests need both", file=sys.stderr)
        return 1
    print("services: PostgreSQL and Redis answer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
