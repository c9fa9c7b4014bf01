"""llama3hp.inference."""
