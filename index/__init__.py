"""The published index: DuckDB catalog, scan ledger, catalog.parquet export and publishing.

catalog.py holds the DuckDB catalog and its deterministic Parquet export. The ledger, the
`query`/`export`/`download`/`publish` commands and the literature import are still to come.
"""
