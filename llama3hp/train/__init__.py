"""llama3hp.train."""
