"""The error of the logit-store code; stages show it as one paragraph instead of a traceback."""

from pipeline.errors import UserError


class CacheError(UserError, ValueError):
    """The logit store is missing, malformed, or does not match the inputs it is used with."""
