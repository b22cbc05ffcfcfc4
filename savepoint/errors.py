"""The one error base of savepoint: every user-facing failure is a ``SavepointError``."""


class SavepointError(Exception):
    """A failure the user can act on. The message says what failed, where, and how to fix it."""


class ConfigError(SavepointError):
    """One or more problems in the TOML file or the command line, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = "invalid configuration" if len(problems) != 1 else "invalid configuration:"
        if len(problems) == 1:
            super().__init__(f"{head} {problems[0]}")
        else:
            body = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{head} ({len(problems)} problems):\n{body}")


class CheckpointError(SavepointError):
    """A checkpoint could not be saved, found or loaded."""


class NotSupportedYet(SavepointError):
    """An option that parses but whose feature has not landed yet."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes do not match the checksums written with it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks the unpickler for an object it may not build."""
