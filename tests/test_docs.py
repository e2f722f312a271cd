"""The documentation: links that lead somewhere, every setting in the reference, a short README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config import SETTINGS, load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "SECURITY.md",
        ROOT / "bench" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """The fragment GitHub gives each heading of `page` (code blocks skipped, repeats numbered)."""
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def local_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_a_heading(page: Path) -> None:
    """Guards links to moved sections: a renamed heading or a page that moved leaves a dead link."""
    dead = []
    for target in local_links(page):
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists() or (
            fragment and destination.suffix == ".md" and fragment not in anchors(destination)
        ):
            dead.append(target)
    assert not dead, f"{page.relative_to(ROOT)}: {dead}"


def test_configuration_reference_lists_every_setting() -> None:
    """Guards a setting added to Config but left out of docs/configuration.md's table."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = {cell for line in text.splitlines() for cell in re.findall(r"^\| (.+?) \|", line)}
    listed = {key for row in rows for key in re.findall(r"`([a-z_.]+)`", row)}
    assert set(SETTINGS) <= listed, sorted(set(SETTINGS) - listed)


def test_readme_is_short_and_shows_the_test_command_ci_runs() -> None:
    """Guards README against growing back into a reference, and its test command against drift."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 420
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
    ci = (ROOT / ".ci" / "run").read_text()
    assert any(
        line.split("#")[0].strip() in ci
        for block in blocks
        for line in block.splitlines()
        if line.startswith("scripts/test")
    )


def test_user_documentation_names_no_issue_numbers_or_in_house_names() -> None:
    """Guards user documentation against lab-notebook references readers cannot follow."""
    for page in [ROOT / "README.md", ROOT / "SECURITY.md", *(ROOT / "docs").glob("*.md")]:
        text = page.read_text()
        assert not re.search(r"\bissue \d+|second door", text, re.IGNORECASE), page


def test_readme_configuration_examples_load(tmp_path: Path) -> None:
    """Guards a YAML example in README that the proxy would refuse to start with."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert blocks
    for block in blocks:
        config = tmp_path / "proxy.yml"
        config.write_text(block if "htpasswd:" in block else f"htpasswd: /h\n{block}")
        load_config(config, {})
