"""superweight: the index of super weights in open LLM checkpoints, and the scanner that finds them.

One installed name. `superweight.scanner` finds super weights (installed from the repo's `scanner/`
folder), `superweight.index` stores and publishes them (from `index/`), and `superweight.cli` is
the `superweight` command.
"""
