"""The data module's exceptions."""


class DataFormatError(ValueError):
    """A data file is malformed (bad magic number, truncated, non-numeric cell, ...)."""


class _MissingKeyError(DataFormatError, KeyError):
    # KeyError so ``except KeyError`` works; ValueError's str() so the message
    # is not shown wrapped in quotes.
    __str__ = ValueError.__str__


class NotFittedError(ValueError, AttributeError):
    """Raised when a transformer is used before ``fit`` (as in scikit-learn)."""
