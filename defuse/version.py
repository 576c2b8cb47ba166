"""The running defuse's version (recorded with every finished stage; kept in step with pyproject.toml)."""

__version__ = "0.1.0"
