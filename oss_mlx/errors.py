"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class OssMlxError(Exception):
    """A user-facing failure: bad input, missing model, full context, no network."""
