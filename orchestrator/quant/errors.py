"""Errors raised by the fake-quant core.

Every error names the bad value and what is allowed, in one line, so that a CLI can print
``str(err)`` and exit non-zero without a traceback.
"""


class QuantError(Exception):
    """Base class for every error the quantization core raises on purpose."""


class QuantConfigError(QuantError, ValueError):
    """A configuration value is outside what the core supports."""


class NotCalibratedError(QuantError, RuntimeError):
    """A quantizer ran before it had an encoding (compute_encodings or load_encodings)."""


class EncodingsFileError(QuantError, ValueError):
    """An encodings file is malformed or does not match the model."""


class CalibrationError(QuantError, ValueError):
    """Calibration data a quantizer cannot turn into an encoding (NaN/inf values, no data)."""


class QuantFileError(QuantError, OSError):
    """A file the core reads or writes (ONNX model, export directory) is missing, corrupt or unwritable."""
