"""Size limits of a structured-output guide, checked before its grammar is compiled (docs/design.md §12).

checkpoint ──builder──▶ engine dir ──[runtime: admission ▶ guide limits]──▶ grammar compile ──▶ Triton

xgrammar's compile time and memory grow faster than linearly with some shapes of a guide. On a 128k
vocabulary a JSON schema object with 1,000 optional properties took 7.4 s (2,000: 77 s, and gigabytes),
40,000 required properties 80 s, a choice of 100,000 strings 19 s. Even on the 384-token test vocabulary
(2-core machine under load): 1,000 optional properties 2.2 s, 4 objects of 256 optional properties 1.0 s
and 12 of them 7.9 s, 8,000 required properties 6.3 s, a regular expression of 100,000 characters 2.1 s.
`check_guide` reads the guide's size in one cheap pass (no compile) and refuses one past any limit with a
ValueError naming the limit and the guide's count. A compile still slower than
`GuideLimits.compile_timeout_s` is abandoned by the server (nemodiff/serving/grammar_workers.py).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from nemodiff.runtime.request import Guide

_BRANCHES = ("anyOf", "oneOf", "allOf", "enum", "prefixItems")


@dataclass(frozen=True)
class GuideLimits:
    max_schema_bytes: int = 1024 * 1024  # a JSON schema's text (its shape has the limits below)
    max_text_bytes: int = 32 * 1024  # a regular expression or grammar, or the choices together
    max_properties: int = 1024  # properties of one JSON schema object
    max_optional_properties: int = 512  # properties not required, in all objects together (the expensive kind)
    max_schema_nodes: int = 10_000  # subschemas of a JSON schema, all together
    max_alternatives: int = 4096  # choices of a choice guide; entries of one anyOf, oneOf, allOf or enum
    max_rules: int = 2048  # rules of an EBNF grammar
    compile_timeout_s: float = 10.0  # a compile running longer is abandoned (the request gets a 400)


DEFAULT_LIMITS = GuideLimits()
_PASSED: OrderedDict[tuple, None] = OrderedDict()  # guides that passed lately: checked again by a lookup
_PASSED_SIZE = 32
_lock = threading.Lock()


def _refuse(what: str, limit: int, name: str) -> None:
    raise ValueError(f"the guide is too large to compile: {what}; the limit is {limit} ({name})")


def check_guide(guide: Guide, limits: GuideLimits = DEFAULT_LIMITS) -> None:
    """ValueError naming the limit when the guide is larger than `limits` allow. A guide checked again (the
    servers check it on their request thread, then the engine at admission) costs a lookup."""
    key = (guide.kind, guide.text, guide.choices, limits)
    with _lock:
        if key in _PASSED:
            _PASSED.move_to_end(key)
            return
    _check(guide, limits)
    with _lock:
        _PASSED[key] = None
        while len(_PASSED) > _PASSED_SIZE:
            _PASSED.popitem(last=False)


def _check(guide: Guide, limits: GuideLimits) -> None:
    if guide.kind == "choice" and len(guide.choices) > limits.max_alternatives:
        _refuse(f"it has {len(guide.choices)} choices", limits.max_alternatives, "max_alternatives")
    size = len(guide.text.encode("utf-8", "surrogatepass")) + sum(len(c.encode("utf-8", "surrogatepass"))
                                                                   for c in guide.choices)
    limit, name = ((limits.max_schema_bytes, "max_schema_bytes") if guide.kind == "json_schema" else
                   (limits.max_text_bytes, "max_text_bytes"))
    if size > limit:
        _refuse(f"its text has {size} bytes", limit, name)
    if guide.kind == "ebnf_grammar":
        rules = guide.text.count("::=")
        if rules > limits.max_rules:
            _refuse(f"its grammar has {rules} rules", limits.max_rules, "max_rules")
    if guide.kind == "json_schema":
        try:
            schema = json.loads(guide.text)
        except (json.JSONDecodeError, RecursionError):
            return  # the compiler names what is wrong with it
        _check_schema(schema, limits)


def _check_schema(schema, limits: GuideLimits) -> None:
    nodes, optional, stack = 0, 0, [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        nodes += 1
        if nodes > limits.max_schema_nodes:
            _refuse(f"its schema has more than {limits.max_schema_nodes} subschemas", limits.max_schema_nodes,
                    "max_schema_nodes")
        properties = value.get("properties")
        if isinstance(properties, dict):
            if len(properties) > limits.max_properties:
                _refuse(f"an object of its schema has {len(properties)} properties", limits.max_properties,
                        "max_properties")
            required = value.get("required")
            required = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) \
                else set()
            optional += len(properties.keys() - required)
            if optional > limits.max_optional_properties:
                _refuse(f"its schema has more than {limits.max_optional_properties} optional properties",
                        limits.max_optional_properties, "max_optional_properties")
        for name in _BRANCHES:
            branches = value.get(name)
            if isinstance(branches, list) and len(branches) > limits.max_alternatives:
                _refuse(f"an {name} of its schema has {len(branches)} entries", limits.max_alternatives,
                        "max_alternatives")
        stack.extend(v for v in value.values() if isinstance(v, (dict, list)))
