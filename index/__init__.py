"""The published index: DuckDB catalog, scan ledger, catalog.parquet export and publishing.

Built on the scanner's result dicts; see the catalog issue. Nothing here yet.
"""
