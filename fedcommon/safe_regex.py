"""Regular expressions from a deployed archive, matched in time linear in the text (no backtracking).

Python's `re` backtracks: `^(a+)+$` against "aaa…!" takes exponential time under the GIL, so a
pattern from an MMAR (`exclude_vars`) could freeze the server. Here the pattern is parsed with
Python's own parser (so its syntax is Python's) and run as a Thompson NFA, simulated over the set of
live states (Thompson 1968; Cox, "Regular Expression Matching Can Be Simple And Fast", 2007):
O(len(text) × states). What a finite automaton cannot do (back-references, look-arounds, atomic
groups, conditionals, flags that change matching) is refused when the pattern is compiled.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

# Python's own regex parser and its opcodes: the syntax accepted is exactly Python's.
from re import _constants as C
from re import _parser as P

MAX_PATTERN = 1000  # characters
MAX_STATES = 20_000  # after counted repeats are expanded


class UnsafePattern(ValueError):
    """A pattern that cannot be matched safely (or is not a valid pattern); the message says which part."""


_CATEGORIES: dict[object, Callable[[str], bool]] = {
    C.CATEGORY_DIGIT: str.isdecimal,
    C.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    C.CATEGORY_SPACE: str.isspace,
    C.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    C.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    C.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
}


@dataclass
class _State:
    kind: str  # "char", "split", "assert", "match"
    test: Callable[[str], bool] | None = None
    at: object = None
    out: list[int] = field(default_factory=list)


class SafePattern:
    """A compiled pattern; `search` tells whether it matches anywhere in a text, like `re.search`."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise UnsafePattern(f"a pattern must be a string, got {type(pattern).__name__}")
        if len(pattern) > MAX_PATTERN:
            raise UnsafePattern(f"pattern is {len(pattern)} characters long, more than {MAX_PATTERN}")
        try:
            parsed = P.parse(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise UnsafePattern(f"invalid regular expression {pattern!r}: {e}") from None
        if parsed.state.flags & ~(re.UNICODE | re.DOTALL):
            raise UnsafePattern(f"{pattern!r}: inline flags other than (?s) are not supported")
        self.pattern = pattern
        self._dotall = bool(parsed.state.flags & re.DOTALL)
        self._states: list[_State] = []
        self._start, ends = self._sequence(list(parsed))
        self._patch(ends, self._add(_State("match")))

    def search(self, text: str) -> bool:
        """Whether the pattern matches somewhere in `text`."""
        current: set[int] = set()
        for i in range(len(text) + 1):
            self._close(self._start, text, i, current)
            if any(self._states[s].kind == "match" for s in current):
                return True
            if i == len(text):
                return False
            ch = text[i]
            following: set[int] = set()
            for s in current:
                state = self._states[s]
                if state.kind == "char" and state.test(ch):
                    self._close(state.out[0], text, i + 1, following)
            current = following
        return False

    # ---- building the automaton: each fragment is (start state, dangling exits to patch) ----------

    def _add(self, state: _State) -> int:
        if len(self._states) >= MAX_STATES:
            raise UnsafePattern(f"{self.pattern!r} needs more than {MAX_STATES} states (counted repeats too large)")
        self._states.append(state)
        return len(self._states) - 1

    def _patch(self, exits: list[tuple[int, int]], target: int) -> None:
        for state, slot in exits:
            outs = self._states[state].out
            outs[slot] = target

    def _empty(self) -> tuple[int, list[tuple[int, int]]]:
        s = self._add(_State("split", out=[-1]))
        return s, [(s, 0)]

    def _sequence(self, items: list) -> tuple[int, list[tuple[int, int]]]:
        if not items:
            return self._empty()
        start, exits = self._node(*items[0])
        for op, arg in items[1:]:
            nxt, nxt_exits = self._node(op, arg)
            self._patch(exits, nxt)
            exits = nxt_exits
        return start, exits

    def _char(self, test: Callable[[str], bool]) -> tuple[int, list[tuple[int, int]]]:
        s = self._add(_State("char", test=test, out=[-1]))
        return s, [(s, 0)]

    def _node(self, op, arg) -> tuple[int, list[tuple[int, int]]]:
        if op is C.LITERAL:
            return self._char(chr(arg).__eq__)
        if op is C.NOT_LITERAL:
            return self._char(chr(arg).__ne__)
        if op is C.ANY:
            return self._char((lambda ch: True) if self._dotall else (lambda ch: ch != "\n"))
        if op is C.IN:
            return self._char(self._char_class(arg))
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, body = arg
            if add_flags or del_flags:
                raise UnsafePattern(f"{self.pattern!r}: scoped inline flags are not supported")
            return self._sequence(list(body))
        if op is C.BRANCH:
            starts, exits = [], []
            for alternative in arg[1]:
                s, e = self._sequence(list(alternative))
                starts.append(s)
                exits += e
            split = self._add(_State("split", out=starts))
            return split, exits
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, body = arg
            return self._repeat(low, None if high == C.MAXREPEAT else high, list(body))
        if op is C.AT:
            if arg not in (C.AT_BEGINNING, C.AT_BEGINNING_STRING, C.AT_END, C.AT_END_STRING):
                raise UnsafePattern(f"{self.pattern!r}: {str(arg).lower()} is not supported (use ^, $, \\A or \\Z)")
            s = self._add(_State("assert", at=arg, out=[-1]))
            return s, [(s, 0)]
        raise UnsafePattern(
            f"{self.pattern!r}: {str(op).lower()} is not supported by the linear-time matcher "
            "(back-references, look-arounds, atomic groups and conditionals cannot be)"
        )

    def _repeat(self, low: int, high: int | None, body: list) -> tuple[int, list[tuple[int, int]]]:
        # Greedy and lazy repeats match the same set of texts: for `search` the difference does not show.
        pieces: list[tuple[int, list[tuple[int, int]]]] = [self._sequence(body) for _ in range(low)]
        if high is None:
            loop_start, loop_exits = self._sequence(body)
            split = self._add(_State("split", out=[loop_start, -1]))
            self._patch(loop_exits, split)
            pieces.append((split, [(split, 1)]))
        else:
            for _ in range(high - low):
                s, e = self._sequence(body)
                split = self._add(_State("split", out=[s, -1]))
                pieces.append((split, [*e, (split, 1)]))
        if not pieces:
            return self._empty()
        start, exits = pieces[0]
        for s, e in pieces[1:]:
            self._patch(exits, s)
            exits = e
        return start, exits

    def _char_class(self, items: list) -> Callable[[str], bool]:
        negate = False
        tests: list[Callable[[str], bool]] = []
        for op, arg in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                tests.append(chr(arg).__eq__)
            elif op is C.RANGE:
                tests.append(lambda ch, lo=arg[0], hi=arg[1]: lo <= ord(ch) <= hi)
            elif op is C.CATEGORY and arg in _CATEGORIES:
                tests.append(_CATEGORIES[arg])
            else:
                raise UnsafePattern(f"{self.pattern!r}: {str(op).lower()} in a character class is not supported")
        if negate:
            return lambda ch: not any(t(ch) for t in tests)
        return lambda ch: any(t(ch) for t in tests)

    # ---- running it ------------------------------------------------------------------------------

    def _close(self, state: int, text: str, i: int, into: set[int]) -> None:
        """Add `state` and every state reachable from it without reading a character at position i."""
        stack = [state]
        while stack:
            s = stack.pop()
            if s in into:
                continue
            into.add(s)
            st = self._states[s]
            if st.kind == "split":
                stack.extend(o for o in st.out if o >= 0)
            elif st.kind == "assert" and self._holds(st.at, text, i):
                stack.append(st.out[0])

    @staticmethod
    def _holds(at: object, text: str, i: int) -> bool:
        if at in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return i == 0
        if at is C.AT_END:
            return i == len(text) or (i == len(text) - 1 and text[i] == "\n")
        return i == len(text)  # AT_END_STRING


@functools.lru_cache(maxsize=64)
def compile_safe(pattern: str) -> SafePattern:
    """A pattern that matches in linear time; UnsafePattern names what cannot be (or is not a pattern)."""
    return SafePattern(pattern)
