"""The error types every package raises for bad user input (docs/conventions.md §14).

It sits below all packages so that data_pipeline and parallel, which import nothing of ours
otherwise, raise the same family of errors the CLI turns into a message and an exit code.
"""


class DlmError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""


class ConfigError(DlmError):
    """A configuration value that cannot work."""


class DataError(DlmError):
    """A corpus, tokenizer or shard that cannot be used."""


class CheckpointError(DlmError):
    """A checkpoint that cannot be saved or loaded."""
