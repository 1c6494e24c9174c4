"""The error types of a training run, and the exit status each one gets.

`training/train.py:main` catches them and prints a single line naming the file (or
the step) and the problem:

* `TrainError`: bad input or configuration a user can fix (bad flags, missing shards,
  resume mismatch, an output folder that is not ours); exit status 2, raised before
  anything in the output folder is written.
* `RunFailed`: the run started and cannot go on (a non-finite loss, an output that
  stopped accepting writes); exit status 1. What was saved before it stays valid.

Bugs raise anything else and keep their traceback.
"""


class TrainError(Exception):
    """Bad input or configuration; the message says what and how to fix it."""


class RunFailed(Exception):
    """The run stopped on a failure during training; the message names the step or the file."""
