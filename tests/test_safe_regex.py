"""The linear-time matcher for patterns from deployed archives: same answers as `re`, no backtracking."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcommon.mmar import excluded
from fedcommon.safe_regex import MAX_PATTERN, UnsafePattern, compile_safe

_ATOMS = st.sampled_from(["a", "b", ".", "[ab]", "[^a]", r"\d", r"\.", "x", "(a|b)", "(ab|a)", "()"])


@st.composite
def patterns(draw, depth: int = 3) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 5 if depth > 0 else 2))
        if kind <= 2:
            piece = draw(_ATOMS)
        elif kind == 3:
            piece = f"({draw(patterns(depth - 1))})"
        elif kind == 4:
            piece = f"({draw(patterns(depth - 1))}|{draw(patterns(depth - 1))})"
        else:
            piece = f"(?:{draw(patterns(depth - 1))})"
        piece += draw(st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "*?", "+?", "{0,}"]))
        parts.append(piece)
    anchor_start = draw(st.sampled_from(["", "^", r"\A"]))
    anchor_end = draw(st.sampled_from(["", "$", r"\Z"]))
    return anchor_start + "".join(parts) + anchor_end


@settings(max_examples=400, deadline=None)
@given(patterns(), st.text(alphabet="abx.1\n", max_size=12))
def test_matches_what_re_matches(pattern, text):
    assert compile_safe(pattern).search(text) == (re.search(pattern, text) is not None)


def test_a_catastrophic_pattern_answers_at_once():
    """Hardening item 11: `^(a+)+$` against "a"*48 + "!" pinned a core of the server under `re`."""
    # `re` needs about 2**48 steps here (the test would run into pytest's timeout); the automaton a few thousand.
    assert not excluded("a" * 48 + "!", "^(a+)+$")
    assert excluded("a" * 48, "^(a+)+$")


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "groupref"),
        ("(?=a)b", "assert"),
        ("(?<!a)b", "assert_not"),
        ("(?>a*)a", "atomic_group"),
        ("(?i)a", "inline flags"),
        (r"\bout", "at_boundary"),
        ("a{100000}", "states"),
        ("(", "invalid regular expression"),
        ("a" * (MAX_PATTERN + 1), "characters long"),
    ],
)
def test_what_an_automaton_cannot_do_is_refused_by_name(pattern, why):
    with pytest.raises(UnsafePattern, match=re.escape(why)):
        compile_safe(pattern)


def test_exclude_vars_patterns_of_the_examples_still_work():
    assert excluded("1.running_mean", r"^1\.running_")
    assert not excluded("11.running_mean", r"^1\.running_")
    assert excluded("out.weight", "^out\\.")
    assert excluded("fc.bias", ["fc.bias"]) and not excluded("fc.bias", ["fc.weight"])
