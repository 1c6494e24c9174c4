"""The one error type for input a user can fix (bad flags, missing shards, resume mismatch).

`training/train.py:main` catches it, prints a single line naming the file and the
problem, and exits with status 2. Bugs raise anything else and keep their traceback.
"""


class TrainError(Exception):
    """Bad input or configuration; the message says what and how to fix it."""
