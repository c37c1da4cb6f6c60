"""The JSON log formatter: an exception's details only when DEBUG is asked for."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from sekisho.logs import JsonFormatter


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = root.level
    yield root
    root.setLevel(saved)


def _formatted_failure() -> dict[str, object]:
    def deep_inside() -> None:
        raise RuntimeError("the widget broke")

    try:
        deep_inside()
    except RuntimeError:
        record = logging.getLogger("sekisho.test").makeRecord(
            "sekisho.test", logging.ERROR, __file__, 1, "unexpected error", (), None
        )
        record.exc_info = sys.exc_info()
    return dict(json.loads(JsonFormatter().format(record)))


def test_an_exception_is_only_its_type_by_default(root_level: logging.Logger) -> None:
    root_level.setLevel(logging.INFO)
    doc = _formatted_failure()
    assert doc["exc_type"] == "RuntimeError"
    assert "traceback" not in doc and "exc_message" not in doc


def test_debug_logs_the_traceback_and_message(root_level: logging.Logger) -> None:
    """What the CLI's internal-error message advises (--log-level DEBUG) gives the details:
    before, the formatter dropped them at every level."""
    root_level.setLevel(logging.DEBUG)
    doc = _formatted_failure()
    assert doc["exc_type"] == "RuntimeError"
    assert doc["exc_message"] == "the widget broke"
    assert "deep_inside" in str(doc["traceback"])
    assert "\n" not in JsonFormatter().format(logging.makeLogRecord({"msg": "x"}))
