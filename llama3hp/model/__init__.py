"""llama3hp.model."""
