"""A checkpoint written before a config key existed resumes when the key holds its default (the behaviour it
was trained with) and is refused, naming the key, at any other value."""
import pytest

from data.schema import ConfigError
from train import resume


def _fingerprints():
    current = {**resume.schema_defaults(), "data.vocabularies": "a" * 64, "data.contents": "b" * 64}
    saved = {k: v for k, v in current.items() if k != "loss.user_dropout"}   # written before the knob existed
    return saved, current


def test_a_key_added_later_at_its_default_resumes_and_is_recorded(tmp_path):
    saved, current = _fingerprints()
    changes = resume.check(tmp_path, 4, saved, current, allowed=[])
    assert changes == {"loss.user_dropout": ["<absent>", 0.0]}


def test_a_key_added_later_away_from_its_default_is_refused(tmp_path):
    saved, current = _fingerprints()
    current["loss.user_dropout"] = 0.3
    with pytest.raises(ConfigError, match=r"loss.user_dropout changed <absent> -> 0.3"):
        resume.check(tmp_path, 4, saved, current, allowed=[])
    assert resume.check(tmp_path, 4, saved, current, allowed=["loss.user_dropout"]) == \
        {"loss.user_dropout": ["<absent>", 0.3]}
