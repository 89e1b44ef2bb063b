"""The one exception family the CLI turns into a message without a traceback."""


class AdapterkitError(Exception):
    """A user-facing error: the message says what is wrong and where."""


class ConfigError(AdapterkitError):
    """A recipe or override is wrong: unknown key, wrong type, impossible value."""


class DataError(AdapterkitError):
    """A data file is wrong: the message names the file, row and field."""


class CompatibilityError(AdapterkitError):
    """An adapter does not fit the base or the stack it is asked to join."""


class RegistryError(AdapterkitError):
    """A registry operation cannot be done: unknown name or version, bad name, bad profile."""


class IntegrityError(AdapterkitError):
    """A file on disk does not match its recorded sha256."""


class OutputError(AdapterkitError):
    """An output path cannot be written without losing something the user did not ask to lose."""


class UnsafePathError(IntegrityError):
    """A path taken from a manifest would leave its directory (absolute, ``..``, a symlink out)."""


class TrainingDiverged(AdapterkitError):
    """The loss became NaN or infinite; the run stopped and nothing was overwritten."""
