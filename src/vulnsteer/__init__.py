"""vulnsteer: measure and steer vulnerability detection in language models."""

__version__ = "0.1.0"
