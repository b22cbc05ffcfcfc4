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


class FatalCheckpointError(SavepointError):
    """A checkpoint problem no later save can fix (the ranks do not share one folder, the folder lock
    is lost to another job): the job stops, where a failed periodic save would let training go on."""


class NotSupportedYet(SavepointError):
    """An option that parses but whose feature has not landed yet."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes do not match the checksums written with it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks the unpickler for an object it may not build."""
