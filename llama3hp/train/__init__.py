"""llama3hp.train: the pre-training loop, schedules, checkpoints, averaging and metrics.

Import the pieces from their modules (`llama3hp.train.trainer`, `.schedules`, `.checkpoint`,
`.average`, `.metrics`); this package stays import-light so `llama3hp --help` is instant.
"""
