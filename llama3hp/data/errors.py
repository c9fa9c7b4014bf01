"""The one exception type the data pipeline raises for bad input."""

from llama3hp.errors import UserError


class DataError(UserError, ValueError):
    """Bad data, file or setting; the message is one line naming the problem and the fix."""
