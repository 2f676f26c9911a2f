"""Errors a user can act on. Each message is one line: what is wrong, then how to fix it."""


class RequantError(Exception):
    """Base for every error the CLI reports as a single line with a non-zero exit."""


class DataError(RequantError):
    """Input data is missing, altered, or failed validation."""


class ModelSourceError(RequantError):
    """The model to requantize cannot be found or is not a requant model."""


class RecipeError(RequantError):
    """A recipe is unknown, misconfigured, or produced a model that fails its checks."""


class ServiceUnavailable(RequantError):
    """A service the run depends on (tracking server, artifact store) failed; retrying later may work."""

    exit_code = 1
