"""The README's options table is the one generated from the code."""
from pathlib import Path

from kombu_pg.config import options_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_options_table_matches_the_code():
    text = README.read_text()
    start, end = "<!-- options-table:start -->\n", "\n<!-- options-table:end -->"
    assert start in text and end in text
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == options_table(), "regenerate with: python -m kombu_pg.config"
