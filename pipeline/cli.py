"""The command-line parser every entry point uses (build, audit, train)."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2), like every other bad input.

    argparse prints the whole usage block before its message; with a dozen flags that
    buries the one line that says what is wrong. `--help` still prints everything."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
