"""The one base class of every expected failure (bad input, bad params, damaged data).

The modules define their own error types (ConfigError, DataError, CacheError, …) next to the code
that raises them; all derive from UserError, so the CLI can show them as one paragraph without
importing every module (a stage imports only what it runs: dvc.yaml's deps stay exact).
"""


class UserError(Exception):
    """A failure the user can fix; its message names the file or key, what is wrong and the fix."""
