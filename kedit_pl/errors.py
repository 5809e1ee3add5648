"""User-facing errors. Each is reported as one line by the entry points (no traceback wall)."""


class KEditError(Exception):
    """Base class: a problem the user can fix; the message names the problem and the fix."""


class ConfigError(KEditError):
    """A bad configuration value (unknown model, missing file, wrong field)."""


class InvalidRecord(KEditError):
    """A dataset record that cannot be edited faithfully (names case_id and field)."""


class EditFailed(KEditError):
    """An edit could not be computed (NaN/inf, subject not found in context). The model is unchanged."""


class DamagedFile(KEditError):
    """A file the run needs cannot be read or fails its checksum (the message names the file)."""


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock (its files must not be touched)."""


class Collapsed(KEditError):
    """A sequential run stopped early: the model's general ability collapsed (perplexity past its limit)."""


class RankFailed(KEditError):
    """A multi-process (DDP) run stopped because another rank failed (that rank prints its own error)."""


class DifferentRecords(KEditError):
    """Runs to be ranked were scored on different records (their summary.json digests differ)."""
