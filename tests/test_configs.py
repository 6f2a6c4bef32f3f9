"""Every config the project ships parses and builds; typed choices are checked by the parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import fails_at_once

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("option, value, choices", [
    ("--model.llm.dtype", "float64", "bfloat16, float16, float32"),
    ("--model.llm.padding_side", "middle", "left, right"),
    ("--data.dataset", "refclef2", "refcoco, refcoco+, refcocog, refclef"),
    ("--data.train_sentences", "some", "one_per_ref, all"),
])
def test_a_choice_outside_its_type_is_refused_listing_the_choices(monkeypatch, capsys, option, value, choices):
    error = fails_at_once(monkeypatch, capsys, "fit", "--config", str(CONFIGS / "refcoco.yaml"), option, value)
    assert value in error
    assert all(choice.strip() in error for choice in choices.split(","))
