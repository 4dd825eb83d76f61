"""README.md stays a five-minute read (<= 8 KB) and every relative link in README.md and docs/ resolves."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links(md: pathlib.Path):
    for target in LINK.findall(md.read_text()):
        if not re.match(r"^[a-z]+:", target) and not target.startswith("#"):
            yield target.split("#")[0]


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= 8192, f"README.md is {size} bytes; keep it <= 8 KB and move detail into docs/"


def test_relative_links_resolve():
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    bad = [f"{p.relative_to(ROOT)} -> {t}" for p in pages for t in _links(p) if not (p.parent / t).exists()]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_readme_links_the_moved_pages():
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/FIDELITY.md", "docs/PERFORMANCE.md", "docs/ACCOUNTING.md", "docs/PRESETS.md",
                 "docs/ARCHITECTURE.md", "benchmarks/RESULTS.md"):
        assert f"]({page}" in readme, f"README.md does not link {page}"
