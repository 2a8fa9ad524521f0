"""The one exception type users see.

Every message is a single line that names the offending field (or file and line) and says how to fix it. The entry
points catch it and exit with that line instead of a traceback.
"""


class LongRopeError(ValueError):
    """Bad input from a user: config keys, files, factors, lengths."""
