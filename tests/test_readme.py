"""The README's first two commands are the ones that CI and users run."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    first = (ROOT / "README.md").read_text().split("```bash\n", 1)[0]
    assert first.strip() == "# tidal"  # nothing before the two commands
    demo, tests = _readme_commands()
    assert demo.endswith("tidal demo")
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
