"""Defensive parsing of teacher output (pure; no model, no Ray).

Small and large teachers alike wrap JSON in prose or code fences, leave trailing commas, use
single quotes, or answer with a bulleted list instead of JSON. These helpers recover what can
be recovered and return None when nothing can, so the caller can retry and then count a drop.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

__all__ = ["extract_json", "parse_string_list", "parse_key_values"]

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_BULLET = re.compile(r"^\s*(?:[-*•·>]+|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+")


def _candidates(text: str):
    """Yield substrings that may hold one JSON value, most likely first."""
    for block in _FENCE.findall(text):
        yield block.strip()
    # Unclosed fence: the model ran out of tokens inside it.
    if text.count("```") % 2 == 1:
        yield text.split("```", 1)[1].split("\n", 1)[-1]
    # Brackets in order of position, so an outer list of objects wins over its first object.
    for start, opener in enumerate(text[:2001]):
        if opener not in "[{":
            continue
        end = _match_bracket(text, start, opener, "}" if opener == "{" else "]")
        yield text[start : end + 1] if end != -1 else text[start:]  # unbalanced: maybe truncated
    yield text.strip()


def _match_bracket(text: str, start: int, opener: str, closer: str) -> int:
    depth, in_str, esc, quote = 0, False, False, ""
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
            continue
        if ch in "\"'" and (ch == '"' or (i > 0 and not text[i - 1].isalnum())):
            in_str, quote = True, ch
        elif ch == opener:
            depth += 1
        elif ch == closer:
            depth -= 1
            if depth == 0:
                return i
    return -1


def _close_truncated(s: str) -> str:
    """Close the strings and brackets a truncated JSON text left open."""
    stack, in_str, esc = [], False, False
    for ch in s:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and stack:
            stack.pop()
    out = s + ('"' if in_str else "")
    out = out.rstrip().rstrip(",").rstrip(":")
    return out + "".join(reversed(stack))


def _loads(s: str) -> Any:
    s = s.strip()
    if not s:
        return None
    for attempt in (s, _TRAILING_COMMA.sub(r"\1", s)):
        try:
            return json.loads(attempt)
        except (json.JSONDecodeError, ValueError):
            pass
        try:  # single quotes, True/False/None
            value = ast.literal_eval(attempt)
            if isinstance(value, (dict, list)):
                return value
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            pass
    return None


def extract_json(text: str, expect: type | tuple[type, ...] = (dict, list)) -> Any:
    """The first JSON value of type `expect` found in `text`, or None.

    Handles prose around the JSON, code fences, trailing commas, Python-style quotes and an
    answer cut off mid-way (closes the open strings and brackets).
    """
    if not text:
        return None
    for cand in _candidates(text):
        value = _loads(cand)
        if value is None and cand[:1] in "[{":
            value = _loads(_TRAILING_COMMA.sub(r"\1", _close_truncated(cand)))
        if isinstance(value, expect) and value not in ({}, []):
            return value
    return None


def _strip_item(item: str) -> str:
    item = _BULLET.sub("", item.strip())
    return item.strip().strip("\"'`*_").strip()


def parse_string_list(text: str, keys: tuple[str, ...] = ()) -> list[str] | None:
    """A list of strings from a JSON list, a JSON object holding one, or a plain list.

    `keys` names the fields to read when items are objects (e.g. ("attribute", "name")) or
    when the answer is an object wrapping the list. Plain answers are read as one item per
    line (bullets and numbering removed) or, on a single line, comma-separated.
    """
    value = extract_json(text)
    if value is None:  # an explicit empty answer ([] or {}) means "nothing", not a one-item list
        blocks = [b.strip() for b in _FENCE.findall(text or "")] or [(text or "").strip()]
        if any(_loads(b) in ([], {}) for b in blocks):
            return None
    if isinstance(value, dict):  # an object wrapping the list, e.g. {"attributes": [...]}
        inner = [value[k] for k in keys if isinstance(value.get(k), list)]
        if not inner:
            return None
        value = inner[0]
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):  # only the named fields: never an object's own keys
                found = next((item[k] for k in keys if isinstance(item.get(k), str)), None)
                if found is not None:
                    out.append(found)
        out = [s for s in (_strip_item(s) for s in out) if s]
        return out or None
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    if len(lines) == 1 and "," in lines[0]:
        lines = lines[0].split(",")
    items = [s for s in (_strip_item(ln) for ln in lines) if s]
    return items or None


def parse_key_values(text: str, keys: dict[str, tuple[str, ...]]) -> dict[str, str] | None:
    """Fields from a JSON object or from `Key: value` lines.

    `keys` maps each wanted field to the names it may appear under (case-insensitive), e.g.
    {"name": ("name", "task name", "title")}. Returns the fields found (values stripped); a
    field spanning several lines in the `Key: value` form runs until the next known key or a
    blank line.
    """
    found: dict[str, str] = {}
    aliases = {alias.lower().replace("_", " "): field for field, names in keys.items() for alias in names}
    value = extract_json(text, expect=dict)
    if isinstance(value, dict):
        for raw_key, raw_val in value.items():
            field = aliases.get(str(raw_key).lower().replace("_", " ").strip())
            if field and field not in found and isinstance(raw_val, (str, int, float)):
                found[field] = str(raw_val).strip()
        if found:
            return found
    pattern = re.compile(
        r"^\s*(?:[-*#>]+\s*)?\**\s*(" + "|".join(re.escape(a) for a in sorted(aliases, key=len, reverse=True))
        + r")\s*\**\s*[:：]\s*(.*)$",
        re.IGNORECASE,
    )
    current = None
    for line in (text or "").splitlines():
        m = pattern.match(line.replace("_", " "))
        if m:
            current = aliases[m.group(1).lower()]
            if current in found:  # a second block starts: keep the first
                current = None
                continue
            found[current] = line[m.start(2) :].strip() if m.group(2) else ""
            found[current] = _strip_item(found[current]) if found[current] else ""
        elif not line.strip():
            current = None  # a blank line ends a multi-line value
        elif current is not None:
            found[current] = (found[current] + " " + line.strip()).strip()
    found = {k: v.strip().strip("\"'").strip() for k, v in found.items() if v.strip()}
    return found or None
