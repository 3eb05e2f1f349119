"""``cch ARGS`` is ``twistd -n cch ARGS``: the gateway in the foreground."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "--logger=cch.logs.twistd_observer", "cch", *args]
    run()


if __name__ == "__main__":
    main()
