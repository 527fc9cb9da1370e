"""The `superweight` command line (see cli.py); the library lives in `scanner` and `index`."""
