"""llama3hp.fp8."""
