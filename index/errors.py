"""Named errors raised by the index; the CLI turns each into a one-line message."""


class IndexStoreError(Exception):
    """Base class: the catalog or ledger cannot do what was asked, for a reason we can explain."""


class CatalogLocked(IndexStoreError):
    """Another process holds the catalog's writer lock."""


class LedgerUnavailable(IndexStoreError):
    """The ledger database cannot be opened or migrated."""


class QueryRefused(IndexStoreError):
    """A query that would write, or that DuckDB cannot run."""


class DownloadFailed(IndexStoreError):
    """A published catalog or its manifest could not be fetched."""


class ChecksumMismatch(IndexStoreError):
    """A downloaded catalog.parquet does not match the sha256 of its manifest."""


class PublishFailed(IndexStoreError):
    """A catalog could not be published to its target."""


class NoWorkers(IndexStoreError):
    """No scan worker could start on the Ray cluster."""


class CatalogTooNew(IndexStoreError):
    """The catalog was written by a newer superweight, with a schema this one does not know."""


class CatalogUnavailable(IndexStoreError):
    """The catalog file cannot be created, read or written (not a catalog, no permission, a full disk)."""


class NonFiniteFigures(IndexStoreError):
    """A scan result holds a NaN or an infinity: it is never written as rows."""


class NotACatalog(IndexStoreError):
    """A file offered as a catalog.parquet (or its manifest) is not one: the local copy is kept."""
