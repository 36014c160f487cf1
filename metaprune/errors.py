"""The one base class of errors that mean bad input."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: a wrong path, key, value or file. The message names the offending thing and
    how to fix it, so ``prune.py`` prints it as one line (exit status 2) instead of a traceback.

    Torch-free, so that the command line recognises it without importing torch. A ValueError,
    so that callers catching ValueError keep working."""
