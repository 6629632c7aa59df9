"""The README quotes tables the report renders from results/ablations.json; the tests keep them equal."""

from paths import REPO


def assert_readme_quotes(md: list[str], what: str) -> None:
    """The Markdown table rows of ``md`` (a report section) appear in the README, consecutive and verbatim."""
    table = [line for line in md if line.startswith("|")]
    assert len(table) >= 6, f"results/ablations.json holds no {what}"
    readme = (REPO / "README.md").read_text().splitlines()
    start = readme.index(table[0])
    assert readme[start : start + len(table)] == table
