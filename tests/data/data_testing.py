"""Constants shared by the data tests (a uniquely named module: several test folders have a
conftest.py, so `from conftest import ...` would pick whichever folder is first on sys.path)."""

FAKE_SHA = "f" * 64  # tokenizer hash written into synthetic datasets
