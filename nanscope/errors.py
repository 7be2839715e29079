"""The whole nanscope error hierarchy.

Library code raises these; only the CLI turns them into a one-paragraph message and exit code 2.
Messages name the file, field or index, what was found and what was expected.
"""

from __future__ import annotations


class NanscopeError(Exception):
    """Base class of every error nanscope raises on purpose."""


class InputError(NanscopeError):
    """A user-supplied file or argument cannot be used (missing, corrupt, wrong shape)."""


class CheckpointError(InputError):
    """A checkpoint cannot be read, needs pickled code, or belongs to another model."""


class BatchError(InputError):
    """A batch file does not follow the documented schema."""


class DataError(InputError):
    """A dataset file (COCO / ODVG / grounding annotations, a label map) does not follow its format."""


class ConfigError(InputError):
    """A model config or text encoder cannot be used."""


class DeviceError(InputError):
    """The requested device is not available (e.g. --device cuda without CUDA)."""


class OutputError(InputError):
    """An output path cannot be written."""


class CriterionError(NanscopeError):
    """A user criterion could not be imported, or raised while computing the loss."""


class SpecError(CriterionError, InputError):
    """A `MODULE:ATTR(...)` criterion spec holds something other than literals and calls of MODULE's names."""


class MatchingError(NanscopeError):
    """The Hungarian matcher was given a non-finite cost (scipy would raise an opaque error)."""


class UnknownCodeError(NanscopeError):
    """A finding code that is not in the catalogue was asked for."""


class Interrupt(BaseException):
    """nanscope's own signal raised through user code (e.g. the trace stopping a run where NaN starts): a
    BaseException so a user's `except Exception` cannot swallow it, and never turned into a CriterionError."""
