"""Errors raised by blockcopy, each naming what went wrong and where."""


class BlockCopyError(RuntimeError):
    """Base class of blockcopy's errors."""


class UnsupportedOperationError(BlockCopyError):
    """A model op cannot run block-sparse (it mixes spatial positions, or is not block-aligned)."""

    def __init__(self, op: str, module_path: str, reason: str):
        self.op = op
        self.module_path = module_path
        super().__init__(f"blockcopy cannot run '{op}' block-sparse (in module '{module_path}'): {reason}")


class ControlFlowChangedError(BlockCopyError):
    """The model ran a different sequence of spatial ops than on the clip's first frame."""


class InvalidInputError(BlockCopyError, ValueError):
    """A frame or execution grid that does not fit the clip (shape, dtype, values)."""


class ConfigError(BlockCopyError, ValueError):
    """A BlockCopy setting out of range; names the setting, the value given and what it must be."""

    def __init__(self, name: str, value, expected: str):
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"blockcopy setting '{name}' = {value!r} is invalid: it must be {expected}")


class ProtocolError(BlockCopyError):
    """BlockCopy's calls came in the wrong order (e.g. ``observe`` without a preceding ``select``)."""
