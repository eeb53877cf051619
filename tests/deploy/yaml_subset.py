"""A reader for the block-style YAML subset docker-compose.yml is written in.

Why not PyYAML: the project adds no dependency for one test, and ``docker compose config`` needs
the compose plugin, which CI machines lack. The subset: block mappings and sequences (including
``- key: value`` items), one-line flow sequences ``[a, "b"]``, plain/single/double-quoted scalars
(all kept as strings), ``|``/``|-`` literal blocks and comments. Anything else (anchors, flow
mappings, folded blocks, tags) raises :class:`YamlSubsetError`, so the compose file cannot drift
out of what the test understands without the test saying so.
"""

from __future__ import annotations

import json
import re

# A value: a string, a list of values, or a mapping of strings to values; None for empty.
Node = object

_FLOW_ITEM = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\'(?:[^\']|\'\')*\'|[^,]+?)\s*(?:,|$)')


class YamlSubsetError(ValueError):
    """The text uses YAML outside the supported subset."""


def _strip_comment(text: str) -> str:
    quote = ""
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1] in " \t"):
            return text[:index].rstrip()
    return text


def _split_key(text: str) -> tuple[str, str] | None:
    """``key: value`` -> (key, value); None when the text is not a mapping entry."""
    if text[:1] in "\"'[":
        return None
    match = re.match(r"([^\s:#][^:]*?):(?:\s+(.*)|$)", text)
    return (match.group(1), match.group(2) or "") if match else None


def scalar(text: str) -> str:
    """A scalar's string value, quotes removed."""
    if text.startswith('"'):
        return str(json.loads(text))
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text[:1] in "{&*!>%@`":
        raise YamlSubsetError(f"unsupported YAML: {text!r}")
    return text


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.index = 0

    def peek(self) -> tuple[int, str] | None:
        """(indent, content without comment) of the next meaningful line."""
        while self.index < len(self.lines):
            line = self.lines[self.index]
            content = _strip_comment(line.strip())
            if content:
                return len(line) - len(line.lstrip(" ")), content
            self.index += 1
        return None

    def node(self, min_indent: int) -> Node:
        upcoming = self.peek()
        if upcoming is None or upcoming[0] < min_indent:
            return None
        indent, content = upcoming
        if content == "-" or content.startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def sequence(self, indent: int) -> list[Node]:
        items: list[Node] = []
        while (upcoming := self.peek()) and upcoming[0] == indent and upcoming[1][:2] == "- ":
            rest = upcoming[1][2:].strip()
            if _split_key(rest):
                # "- key: value": a mapping whose keys line up with "key", two columns in.
                self.lines[self.index] = " " * (indent + 2) + rest
                items.append(self.mapping(indent + 2))
            else:
                self.index += 1
                items.append(self.value(rest, indent))
        return items

    def mapping(self, indent: int) -> dict[str, Node]:
        entries: dict[str, Node] = {}
        while (upcoming := self.peek()) and upcoming[0] >= indent:
            entry = _split_key(upcoming[1])
            if upcoming[0] > indent or entry is None:
                raise YamlSubsetError(f"line {self.index + 1}: unexpected {upcoming[1]!r}")
            self.index += 1
            key, rest = entry
            entries[scalar(key)] = self.value(rest, indent)
        return entries

    def value(self, text: str, indent: int) -> Node:
        if not text:
            return self.node(indent + 1)
        if text in ("|", "|-"):
            return self.literal(indent, keep_final_newline=text == "|")
        if text.startswith("["):
            if not text.endswith("]"):
                raise YamlSubsetError(f"flow sequences must fit on one line: {text!r}")
            return [scalar(item) for item in _FLOW_ITEM.findall(text[1:-1]) if item]
        return scalar(text)

    def literal(self, indent: int, *, keep_final_newline: bool) -> str:
        block: list[str] = []
        while self.index < len(self.lines):
            line = self.lines[self.index]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
                break
            block.append(line)
            self.index += 1
        while block and not block[-1].strip():
            block.pop()
        margin = min(len(line) - len(line.lstrip(" ")) for line in block if line.strip())
        text = "\n".join(line[margin:] for line in block)
        return text + "\n" if keep_final_newline else text


def load(text: str) -> Node:
    """The document ``text`` describes."""
    reader = _Reader(text)
    document = reader.node(0)
    if reader.peek() is not None:
        raise YamlSubsetError(f"line {reader.index + 1}: unexpected indentation")
    return document
