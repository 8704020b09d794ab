"""Errors the engine raises with messages a user can act on (shown verbatim on the run page)."""


class EngineError(Exception):
    """Base class: ``str(exc)`` is a complete sentence for the user."""


class ConfigError(EngineError):
    """The run config is invalid (unknown loss, out-of-range value, missing teacher)."""


class DataError(EngineError):
    """The dataset cannot be read as configured (missing column, unknown builtin, empty split)."""


class ModelLoadError(EngineError):
    """A model cannot be built or loaded (unknown hub id, missing folder, label-count mismatch)."""


class TrainingError(EngineError):
    """Training itself went wrong (NaN loss, out of GPU memory)."""
