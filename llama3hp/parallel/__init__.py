"""llama3hp.parallel."""
