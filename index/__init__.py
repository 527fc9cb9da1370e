"""The index: the DuckDB catalog and its catalog.parquet export, the scan ledger, queries, publishing
and downloading, and the crawl that keeps it current (installed as superweight.index)."""
