"""``audit verify --checkpoints FILE``: whatever the file holds, a file that is not checkpoints
is bad input (exit 65), never an uncaught exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.audit.conftest import run_cli


@pytest.mark.parametrize(
    "content",
    [
        "[" * 100_000 + "]" * 100_000 + "\n",  # json's parser recursed once per bracket
        '{"seq": ' * 50_000 + "1" + "}" * 50_000 + "\n",
    ],
    ids=["nested-lists", "nested-objects"],
)
def test_a_deeply_nested_checkpoints_line_is_bad_input(
    cli_data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str
) -> None:
    path = tmp_path / "nested.jsonl"
    path.write_text(content)
    code, _out, err = run_cli(capsys, cli_data_dir, "audit", "verify", "--checkpoints", str(path))
    assert code == 65 and "nested too deeply" in err, err
    assert "Traceback" not in err
