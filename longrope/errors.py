"""The one exception type users see, and how entry points report it.

Every message is a single line that names the offending field (or file and line) and says how to fix it. The entry
points run inside :func:`exit_on_user_error`, which prints that line once (on the first rank of a distributed launch,
not once per process) and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class LongRopeError(ValueError):
    """Bad input from a user: config keys, files, factors, lengths."""


# How long a rank other than the first waits before exiting on a user error, so the first one prints it.
ERROR_GRACE_SECONDS = 10


def _is_first_rank() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Turn a LongRopeError into ``prog: error: <line>`` on stderr (first rank only) and exit status 2."""
    try:
        yield
    except LongRopeError as error:
        if _is_first_rank():
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        else:
            # The other ranks meet the same error at about the same moment; one that exited first would have torchrun
            # kill the first rank before it printed the line (seen on a loaded CI machine).
            import time

            time.sleep(ERROR_GRACE_SECONDS)
        raise SystemExit(2) from None
