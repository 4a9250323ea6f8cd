"""The README's benchmark block is the committed run's, word for word (`make bench` writes both)."""

from __future__ import annotations

from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent


def test_readme_shows_the_committed_benchmark_run() -> None:
    readme = (ROOT / "README.md").read_text()
    latest = (ROOT / "bench" / "results" / "LATEST.md").read_text()
    block = readme[readme.index(report.README_START):
                   readme.index(report.README_END) + len(report.README_END)]
    assert block == report.readme_section(latest)
    assert "| short requests, saturated |" in block  # the targets table, not an empty block
    assert (ROOT / "bench" / "results" / report.README_CHART).is_file()


def test_update_readme_rewrites_only_the_block(tmp_path: Path) -> None:
    latest = ROOT / "bench" / "results" / "LATEST.md"
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.README_START}\nstale\n{report.README_END}\nafter\n")
    assert report.update_readme(readme, latest)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "stale" not in text
    readme.write_text("no markers\n")
    assert not report.update_readme(readme, latest)
    assert readme.read_text() == "no markers\n"
