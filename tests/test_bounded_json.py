"""JSON intake bounds: size, depth, finite numbers, named in the refusal."""

from __future__ import annotations

import pytest

from fedcommon.bounded_json import JsonBoundsError, loads_bounded, loads_object


def test_values_within_the_bounds_parse_as_json_does():
    assert loads_bounded('{"a": [1, 2.5, {"b": null}]}', "args", 100) == {"a": [1, 2.5, {"b": None}]}
    assert loads_object("", "args", 10) == {} and loads_object(b" {} ", "args", 10) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 982 + "]" * 982, "args_json is nested deeper than 32 levels"),
        ("[" * 100_000 + "]" * 100_000, "args_json is nested deeper than 32 levels"),
        ('{"a": NaN}', "args_json: NaN is not a finite number"),
        ('{"a": -Infinity}', "args_json: -Infinity is not a finite number"),
        ('{"a": 1', "args_json is not valid JSON"),
        ('{"a": "' + "x" * 2000 + '"}', "args_json is 2009 bytes long, more than the 1000 allowed"),
        ("1" * 5000, "args_json is not valid JSON"),
    ],
)
def test_what_breaks_a_bound_is_refused_by_name(text, message):
    """Hardening items 2 and 6: a value nested ~982 deep was accepted and then broke the audit write and status."""
    limit = 1000 if len(text) < 10_000 and "x" in text else 1 << 20
    with pytest.raises(JsonBoundsError) as e:
        loads_bounded(text, "args_json", limit)
    assert message in str(e.value)


def test_an_object_is_required_where_one_is_expected():
    with pytest.raises(JsonBoundsError, match="progress must be a JSON object, got list"):
        loads_object("[1]", "progress", 100)
