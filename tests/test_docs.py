"""docs/reliability.md stays true: every test its table names exists."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_reliability_table_names_existing_tests():
    text = (REPO / "docs" / "reliability.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    references = TEST_REFERENCE.findall(text)
    assert len(rows) > 20 and len(references) >= len(rows) - 1  # the header row names none
    for path, name in references:
        tree = ast.parse((REPO / path).read_text())
        functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in functions, f"docs/reliability.md names {path}::{name}, which does not exist"
