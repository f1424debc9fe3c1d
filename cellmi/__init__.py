"""cellmi: discover cell morphologies in microscopy screens without labels (Deep InfoMax)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
