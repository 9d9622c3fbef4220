"""Errors a user can cause. The CLI prints their one-line message without a traceback."""


class MlxrlError(Exception):
    """Base class: a problem with the user's input, config, data or environment."""

    main_process_only = False  # True: under accelerate/torchrun only RANK 0 prints the message


class ConfigError(MlxrlError):
    pass


class DataError(MlxrlError):
    pass


class RewardError(MlxrlError):
    pass


class ModelError(MlxrlError):
    pass


class MlxrlNote(UserWarning):
    """A one-line note for the user (the CLI prints it as `note: ...`), raised with `warnings.warn`
    by code that has no log function at hand (e.g. adapter conversion)."""
