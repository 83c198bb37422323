"""The error types that mean "the user can fix this", as opposed to a bug in dictlearn.

A command that fails for one of these prints its message as one line (exit status 2): the
message names what is wrong (the field, file, dataset or checkpoint) and how to fix it. Any other
exception escaping a command is a bug in dictlearn: the command prints its traceback and asks for
a report (exit status 1). So raise :class:`UserError` (or a subclass) only for input the user
gave or a condition of their run they can change, never to hide an internal inconsistency.

    raise UserError(f"sae.d_model={d} but the dataset {url} has d_model {n}; ...")
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input, or a condition of their run they can act on.

    Its message says what is wrong and how to fix it. A ``ValueError`` so that code and tests
    catching ``ValueError`` (pydantic validators among them) keep working. Subclasses:
    ``ConfigError``, ``DatasetError``, ``CorpusError``, ``ExportError``, ``FitError``, ...
    """


class MissingInputError(UserError, FileNotFoundError):
    """A file, directory or checkpoint the user named does not exist (also a FileNotFoundError)."""
