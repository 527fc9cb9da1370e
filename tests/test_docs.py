"""The README's two commands and .ci/run stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_install_and_test_commands():
    main, tests = readme_commands()
    assert main.startswith("pip install torch==2.13.0 && ")  # torch first, pinned
    assert main.endswith("superweight crawl example:smollm2")
    assert "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_torch_is_pinned_in_the_package():
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()


def test_readme_documents_every_catalog_column_in_order():
    from superweight.index.catalog import COLUMNS

    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| view `catalog`"))
    assert re.findall(r"`(\w+)`", row.split("the columns of catalog.parquet:")[1]) == list(COLUMNS)
