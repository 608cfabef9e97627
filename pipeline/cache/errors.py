"""The error of the logit-store code; stages show it as one paragraph instead of a traceback."""


class CacheError(ValueError):
    """The logit store is missing, malformed, or does not match the inputs it is used with."""
