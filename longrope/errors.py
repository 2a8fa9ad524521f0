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
        raise SystemExit(2) from None
