"""llama3hp.posttrain."""
