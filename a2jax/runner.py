"""How every command-line entry point runs: `run_main(main)` ends a user error (an A2JaxError) with
its one line on stderr and exit status 2, not a traceback, and names a lost process in a
multi-process run."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from a2jax import distributed
from a2jax.errors import A2JaxError


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
  """Runs a command-line entry point: an A2JaxError ends it with its one-line message on stderr
  and exit status 2, not a traceback; in a multi-process run, an error caused by a lost process
  ends it with one line naming that process (a2jax.distributed.stop_if_process_lost)."""
  try:
    return main(argv)
  except A2JaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    distributed.stop_if_process_lost(e)
    raise
