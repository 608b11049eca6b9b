"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _code_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_starts_with_demo_and_test_commands():
    text = (REPO_ROOT / "README.md").read_text()
    blocks = _code_blocks(text)
    assert "ctseverity demo" in blocks[0]
    assert "pytest" in blocks[1]
    assert text.index(blocks[0]) < text.index(blocks[1]) < text.index("## ")


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = _code_blocks((REPO_ROOT / "README.md").read_text())[1]
    ci_lines = [ln.strip() for ln in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines
