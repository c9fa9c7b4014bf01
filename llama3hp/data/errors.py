"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad data, file or setting; the message is one line naming the problem and the fix."""
