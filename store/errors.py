"""What store verbs raise when a request cannot be applied; routes map them to 4xx answers (5xx
for the storage faults)."""


class StoreError(Exception):
    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class NotFound(StoreError):
    """The thing named does not exist."""


class Conflict(StoreError):
    """It exists already, or its state forbids the change."""


class Rejected(StoreError):
    """The request contradicts itself or the stored state."""


class Forbidden(StoreError):
    """The store will not touch it (a blueprint that links outside the agents dir)."""


class StorageFull(StoreError):
    """The disk, or the database's size cap, is full: the write was not stored."""


class StorageFailed(StoreError):
    """Any other I/O error of the database: the write was not stored."""


class DatabaseUnusable(Exception):
    """The database cannot be opened or used (the message says why, in one line)."""


class DatabaseTooNew(DatabaseUnusable):
    """The database was written by a newer release: refused before anything is written to it."""
