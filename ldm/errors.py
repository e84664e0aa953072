"""The one error type for a caller's mistake.

`InputError` means that what the caller gave (an argument, an option, a file, a folder, a saved model, a
dataset) is unusable; its message names the input, says what is wrong and what to do. The `ldm` command and
the pipeline's stages print such an error in one line and exit 2. Any other exception is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """What the caller gave is unusable; the message names it and says how to fix it."""


class InputNotFoundError(FileNotFoundError, InputError):
    """A file or folder the caller named does not exist."""
