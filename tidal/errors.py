"""Errors tidal raises for bad input. All are ValueErrors, so callers can catch one type."""


class TidalError(ValueError):
    """Base class: something the caller passed was not acceptable."""


class InvalidRequestError(TidalError):
    """A request argument or setting is out of range or of the wrong kind."""


class ImageError(InvalidRequestError):
    """The image could not be read or is unusable."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit in the model's context."""


class CheckpointError(TidalError):
    """A checkpoint folder or file does not hold a loadable model."""
