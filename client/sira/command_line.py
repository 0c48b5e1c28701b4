"""What both command lines (`sira` and `sira-server`) do around their commands: every
failure is one line on stderr and an exit code, never a traceback (unless SIRA_DEBUG=1).

Here, in the client distribution, because the server's command line depends on the
client, never the other way round.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Run = Callable[[list[str], Mapping[str, str]], int]
"""A command line's own work: (arguments, environment) -> exit code."""


def one_line(text: str) -> str:
    return " ".join(text.split())


def run_command_line(run: Run, argv: Sequence[str] | None = None) -> int:
    """`run` with the process's arguments and environment; its exit code. Ctrl-C, a
    reader that left (`| head`) and a bug each end in one line."""
    try:
        return run(list(sys.argv[1:] if argv is None else argv), os.environ)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK  # `sira list | head`: the reader left, nothing to report
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("SIRA_DEBUG"):
            raise
        sys.stderr.write(
            f"error: unexpected {type(exc).__name__}: {one_line(str(exc))} "
            "(SIRA_DEBUG=1 shows the traceback)\n"
        )
        return EXIT_FAILED
