"""llama3hp.data."""
