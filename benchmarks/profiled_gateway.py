"""The gateway (``cch.cli``, i.e. ``twistd -n cch``) under cProfile.

    python -m benchmarks.profiled_gateway OUT.prof --config FILE

The profiler starts disabled, so start-up and warm-up stay out of the profile: SIGUSR2 starts
it (clearing what it had), SIGUSR1 stops it and writes ``OUT.prof``. (twistd ends a process
stopped by SIGTERM by re-raising the signal, so a profile written at exit would never be
written.) Then stop the process as usual.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    state = {"profiler": cProfile.Profile()}

    def start(signum: int, frame: Any) -> None:
        state["profiler"].disable()
        state["profiler"] = cProfile.Profile()
        state["profiler"].enable()

    def dump(signum: int, frame: Any) -> None:
        profiler = state["profiler"]
        profiler.disable()
        tmp = out.with_suffix(".tmp")
        profiler.dump_stats(str(tmp))
        tmp.replace(out)  # whoever waits for the file never sees half of it

    signal.signal(signal.SIGUSR2, start)
    signal.signal(signal.SIGUSR1, dump)
    from cch.cli import main as cch_main

    cch_main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
