"""String nodes (ComfyUI's `utils/string` set): concatenate, substring, length, case, trim, replace, contains,
compare, and regular expressions.

Regular expressions come from workflows, i.e. from anyone who can submit one, and a pattern such as `(x+x+)+y`
backtracks for longer than the universe exists on a long enough input. Python's `re` cannot be stopped, so the
regex nodes use the `regex` module (re-compatible syntax by default) with a time limit: a search that runs past
REGEX_TIMEOUT_S fails the node with an error naming it, and the worker is free again.
"""

from __future__ import annotations

import logging

import regex

from graph.node import Boolean, Combo, Input, Int, Node, Output, String
from graph.types import BOOLEAN, INT, STRING

log = logging.getLogger(__name__)

CATEGORY = "utils/string"
REGEX_TIMEOUT_S = 2.0
CASE_MODES = ["UPPERCASE", "lowercase", "Capitalize", "Title Case"]
TRIM_MODES = ["Both", "Left", "Right"]
COMPARE_MODES = ["Starts With", "Ends With", "Equal"]
EXTRACT_MODES = ["First Match", "All Matches", "First Group", "All Groups"]


def _text(name: str) -> Input:
    return String(name, default=None, multiline=True)


class StringConcatenate(Node):
    display_name = "Concatenate"
    category = CATEGORY
    inputs = [_text("string_a"), _text("string_b"), String("delimiter", default="")]
    outputs = [Output(STRING)]

    def execute(self, string_a, string_b, delimiter):
        return (f"{string_a}{delimiter}{string_b}",)


class StringSubstring(Node):
    """Python slicing: `end` is excluded, negative positions count from the end."""

    display_name = "Substring"
    category = CATEGORY
    inputs = [_text("string"), Input("start", INT), Input("end", INT)]
    outputs = [Output(STRING)]

    def execute(self, string, start, end):
        return (string[start:end],)


class StringLength(Node):
    display_name = "Length"
    category = CATEGORY
    inputs = [_text("string")]
    outputs = [Output(INT, "length")]

    def execute(self, string):
        return (len(string),)


class CaseConverter(Node):
    display_name = "Case Converter"
    category = CATEGORY
    inputs = [_text("string"), Combo("mode", CASE_MODES)]
    outputs = [Output(STRING)]

    def execute(self, string, mode):
        converters = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize,
                      "Title Case": str.title}
        if mode not in converters:
            raise ValueError(f"CaseConverter: mode {mode!r}: expected one of {CASE_MODES}")
        return (converters[mode](string),)


class StringTrim(Node):
    """Removes whitespace (Python's definition: spaces, tabs, newlines, other Unicode spaces) at the ends."""

    display_name = "Trim"
    category = CATEGORY
    inputs = [_text("string"), Combo("mode", TRIM_MODES)]
    outputs = [Output(STRING)]

    def execute(self, string, mode):
        trims = {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}
        if mode not in trims:
            raise ValueError(f"StringTrim: mode {mode!r}: expected one of {TRIM_MODES}")
        return (trims[mode](string),)


class StringReplace(Node):
    """Every occurrence of `find`, literally (no pattern)."""

    display_name = "Replace"
    category = CATEGORY
    inputs = [_text("string"), _text("find"), _text("replace")]
    outputs = [Output(STRING)]

    def execute(self, string, find, replace):
        return (string.replace(find, replace),)


class StringContains(Node):
    display_name = "Contains"
    category = CATEGORY
    inputs = [_text("string"), _text("substring"), Boolean("case_sensitive", default=True)]
    outputs = [Output(BOOLEAN, "contains")]

    def execute(self, string, substring, case_sensitive):
        if not case_sensitive:
            string, substring = string.lower(), substring.lower()
        return (substring in string,)


class StringCompare(Node):
    display_name = "Compare"
    category = CATEGORY
    inputs = [_text("string_a"), _text("string_b"), Combo("mode", COMPARE_MODES),
              Boolean("case_sensitive", default=True)]
    outputs = [Output(BOOLEAN)]

    def execute(self, string_a, string_b, mode, case_sensitive):
        if not case_sensitive:
            string_a, string_b = string_a.lower(), string_b.lower()
        if mode == "Starts With":
            return (string_a.startswith(string_b),)
        if mode == "Ends With":
            return (string_a.endswith(string_b),)
        if mode == "Equal":
            return (string_a == string_b,)
        raise ValueError(f"StringCompare: mode {mode!r}: expected one of {COMPARE_MODES}")


def _flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    return ((regex.IGNORECASE if case_insensitive else 0) | (regex.MULTILINE if multiline else 0)
            | (regex.DOTALL if dotall else 0))


def _compile(node: str, pattern: str, flags: int) -> regex.Pattern:
    try:
        return regex.compile(pattern, flags)
    except regex.error as exc:
        raise ValueError(f"{node}: regex_pattern {pattern!r} is not a valid regular expression ({exc})") from None


def _timed_out(node: str, pattern: str, length: int) -> TimeoutError:
    return TimeoutError(f"{node}: regex_pattern {pattern!r} ran longer than {REGEX_TIMEOUT_S:g} s on a "
                        f"{length}-character string and was stopped (a pattern with nested repetition, such as "
                        f"(a+)+, can take exponential time)")


class RegexMatch(Node):
    display_name = "Regex Match"
    category = CATEGORY
    inputs = [_text("string"), _text("regex_pattern"), Boolean("case_insensitive", default=True),
              Boolean("multiline", default=False), Boolean("dotall", default=False)]
    outputs = [Output(BOOLEAN, "matches")]

    def execute(self, string, regex_pattern, case_insensitive, multiline, dotall):
        pattern = _compile("RegexMatch", regex_pattern, _flags(case_insensitive, multiline, dotall))
        try:
            return (pattern.search(string, timeout=REGEX_TIMEOUT_S) is not None,)
        except TimeoutError:
            raise _timed_out("RegexMatch", regex_pattern, len(string)) from None


def _group(match: regex.Match, index: int) -> str | None:
    """Group `index` of a match (0: the whole match); None when the pattern has fewer groups. A group that took
    no part in the match is the empty string."""
    if index > len(match.groups()):
        return None
    return match.group(index) or ""


class RegexExtract(Node):
    """"First Match" / "All Matches" give the whole matches, "First Group" / "All Groups" group `group_index` of
    them (0 is the whole match); several results are joined with newlines, none gives an empty string."""

    display_name = "Regex Extract"
    category = CATEGORY
    inputs = [_text("string"), _text("regex_pattern"), Combo("mode", EXTRACT_MODES),
              Boolean("case_insensitive", default=True), Boolean("multiline", default=False),
              Boolean("dotall", default=False), Int("group_index", default=1, min=0, max=100, step=None)]
    outputs = [Output(STRING)]

    def execute(self, string, regex_pattern, mode, case_insensitive, multiline, dotall, group_index):
        if mode not in EXTRACT_MODES:
            raise ValueError(f"RegexExtract: mode {mode!r}: expected one of {EXTRACT_MODES}")
        pattern = _compile("RegexExtract", regex_pattern, _flags(case_insensitive, multiline, dotall))
        index = 0 if mode in ("First Match", "All Matches") else group_index
        try:
            if mode.startswith("First"):
                match = pattern.search(string, timeout=REGEX_TIMEOUT_S)
                found = [] if match is None else [_group(match, index)]
            else:
                found = [_group(m, index) for m in pattern.finditer(string, timeout=REGEX_TIMEOUT_S)]
        except TimeoutError:
            raise _timed_out("RegexExtract", regex_pattern, len(string)) from None
        return ("\n".join(text for text in found if text is not None),)


class RegexReplace(Node):
    """`replace` may name groups (`\\1`, `\\g<name>`); `count` 0 replaces every match."""

    display_name = "Regex Replace"
    category = CATEGORY
    description = "Find and replace text using regex patterns."
    inputs = [_text("string"), _text("regex_pattern"), _text("replace"),
              Boolean("case_insensitive", default=True, optional=True),
              Boolean("multiline", default=False, optional=True), Boolean("dotall", default=False, optional=True),
              Int("count", default=0, min=0, max=100, step=None, optional=True)]
    outputs = [Output(STRING)]

    def execute(self, string, regex_pattern, replace, case_insensitive=True, multiline=False, dotall=False, count=0):
        pattern = _compile("RegexReplace", regex_pattern, _flags(case_insensitive, multiline, dotall))
        try:
            return (pattern.sub(replace, string, count=count, timeout=REGEX_TIMEOUT_S),)
        except TimeoutError:
            raise _timed_out("RegexReplace", regex_pattern, len(string)) from None
        except (regex.error, IndexError) as exc:
            raise ValueError(f"RegexReplace: replace {replace!r} does not fit regex_pattern {regex_pattern!r} "
                             f"({exc})") from None


NODE_CLASSES = [StringConcatenate, StringSubstring, StringLength, CaseConverter, StringTrim, StringReplace,
                StringContains, StringCompare, RegexMatch, RegexExtract, RegexReplace]
