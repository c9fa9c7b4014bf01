"""The one exception type the data pipeline raises for bad input, and the check both loaders share."""

from llama3hp.errors import UserError


class DataError(UserError, ValueError):
    """Bad data, file or setting; the message is one line naming the problem and the fix."""


def check_dp_slice(dp_rank: int, dp_size: int) -> None:
    """A loader's data-parallel slice: rank dp_rank of dp_size."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank} dp_size={dp_size}")
