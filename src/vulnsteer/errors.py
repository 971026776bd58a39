"""The one exception the CLI turns into a clear one-line message and a non-zero exit."""


class VulnsteerError(Exception):
    """A user-facing error: bad input, a missing file, an invalid configuration."""
