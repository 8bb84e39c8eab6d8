"""Structured-output benchmark: validity, tokens per forward, speed and grammar cost per step, per mode.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: structured output per mode]

Every mode decodes the same prompts at temperature 0 under one JSON schema (`SCHEMA`: a name, a place
and a count, strings bounded so that the bundled nld-tiny, which knows only templated English, always
finishes the object well inside the token budget) and without it. Each guided output is parsed with
`json.loads` (strict: no raw control characters) and checked against the schema by `schema_problem`,
a checker of exactly the JSON-schema subset used here. The spec modes also run with unshaped drafts
(`guided_drafts=False`), to show what grammar-shaped drafts add to acceptance. Tokens per second is
the batch's output tokens over the wall time of its `generate` call (all prompts at once), the
fastest of `repeats` calls (at temperature 0 each call writes the same tokens).

The grammar's cost per engine step is nemodiff/bench/host.py's host-overhead measurement run twice per mode
and number of running requests, unguided and under `HOST_GUIDE` (a long array of `SCHEMA` objects,
so that no request reaches the grammar's end during the timed steady steps).
"""

from __future__ import annotations

import json
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "place": {"type": "string", "minLength": 1, "maxLength": 16},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "place", "count"],
    "additionalProperties": False,
}
HOST_GUIDE = {"type": "array", "items": SCHEMA, "minItems": 24}
# held-out prompts of the bundled model (one of each corpus template: stories, counting, times tables, plans)
PROMPTS = (
    "Once upon a time there was a small horse named Ruby. Ruby lived in a town near the mountain. Ruby had a white key.",
    "Nora counts from eight to forty one.",
    "Noah says the table of four.",
    "Long ago, in a village near the mill, there lived a clever pig named Ella. Ella had a brown key.",
    "Ben has a plan for the week, starting on Tuesday.",
    "Kate counts down from thirty one to five.",
    "Long ago, in a town near the river, there lived a small wolf named Jack. Jack had an orange map.",
    "Tom says the table of two.",
)
MAX_NEW_TOKENS = 160  # the schema's longest object is 66 characters: room even for multi-token characters
SPEC_MODES = ("linear-spec", "quadratic-spec")
_TYPES = {"object": dict, "string": str, "array": list, "boolean": bool, "number": (int, float), "null": type(None)}


def schema_problem(value, schema: dict, where: str = "$") -> str | None:
    """What is wrong with `value` under `schema` (types, properties, required, additionalProperties,
    min/maxLength, minimum/maximum, items, min/maxItems), or None when it conforms."""
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{where}: expected an integer, got {value!r}"
    elif kind is not None and (not isinstance(value, _TYPES[kind]) or (kind == "number" and isinstance(value, bool))):
        return f"{where}: expected {kind}, got {type(value).__name__}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            return f"{where}: string of length {len(value)} outside [{schema.get('minLength', 0)}, " \
                   f"{schema.get('maxLength', 'inf')}]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            return f"{where}: {value} outside [{schema.get('minimum', '-inf')}, {schema.get('maximum', 'inf')}]"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        missing = [key for key in schema.get("required", ()) if key not in value]
        if missing:
            return f"{where}: missing {', '.join(missing)}"
        extra = [key for key in value if key not in properties]
        if extra and schema.get("additionalProperties", True) is False:
            return f"{where}: unexpected {', '.join(extra)}"
        for key, sub in properties.items():
            if key in value and (problem := schema_problem(value[key], sub, f"{where}.{key}")):
                return problem
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            return f"{where}: {len(value)} items"
        for i, item in enumerate(value):
            if "items" in schema and (problem := schema_problem(item, schema["items"], f"{where}[{i}]")):
                return problem
    return None


def output_problem(text: str, finish_reason: str, schema: dict = SCHEMA) -> str | None:
    """Why a guided output is not a valid instance of the schema (None: it is)."""
    if finish_reason != "stop":
        return f"finished by {finish_reason}, not by the grammar's end"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    return schema_problem(value, schema)


def _variants(mode: str):
    """(guided, guided_drafts) rows of a mode: guided (shaped drafts), guided with unshaped drafts, unguided."""
    yield True, True
    if mode in SPEC_MODES:
        yield True, False
    yield False, None


def structured_runs(llm, modes: list[str], prompts=PROMPTS, max_new_tokens: int = MAX_NEW_TOKENS, repeats: int = 2,
                    on_result=lambda row: None) -> list[dict]:
    """Per mode and variant: validity, tokens per forward and tokens/s over the prompts, at temperature 0."""
    from nemodiff import Guide, SamplingParams

    guide = Guide("json_schema", json.dumps(SCHEMA))
    ids = [llm.tokenizer.encode(p) for p in prompts]
    llm.generate(ids[:1], SamplingParams(max_new_tokens=4, guide=guide))  # compiles the grammar, warms the engine
    rows = []
    for mode in modes:
        for guided, shaped in _variants(mode):
            params = SamplingParams(max_new_tokens=max_new_tokens, mode=mode, guide=guide if guided else None,
                                    guided_drafts=bool(shaped))
            seconds = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                outs = llm.generate(ids, params)
                seconds = min(seconds, time.perf_counter() - start)
            tokens, forwards = sum(len(o.output_ids) for o in outs), sum(o.num_forward_passes for o in outs)
            row = {"mode": mode, "guided": guided, "guided_drafts": shaped, "requests": len(outs),
                   "tokens": tokens, "forwards": forwards, "tokens_per_forward": tokens / max(forwards, 1),
                   "seconds": seconds, "repeats": repeats, "tokens_per_s": tokens / seconds,
                   "sample": outs[0].text}
            if guided:
                problems = [output_problem(o.text, o.finish_reason) for o in outs]
                row["valid"] = sum(p is None for p in problems)
                row["validity"] = row["valid"] / len(outs)
                row["problems"] = [p for p in problems if p is not None][:3]
            rows.append(row)
            on_result(row)
    return rows


def structured_host(llm, modes: list[str], levels: list[int], steps: int) -> list[dict]:
    """nemodiff/bench/host.py's host ms per steady step, unguided and under HOST_GUIDE, per mode and running requests."""
    from nemodiff import Guide
    from nemodiff.bench.host import host_overhead

    return host_overhead(llm, modes, levels, steps=steps, guide=Guide("json_schema", json.dumps(HOST_GUIDE)))


def summary(runs: list[dict]) -> dict:
    """Acceptance of the spec modes with and without grammar-shaped drafts, and of every mode guided and not."""
    out = {}
    for r in runs:
        key = "unguided" if not r["guided"] else ("guided" if r["guided_drafts"] or r["mode"] not in SPEC_MODES
                                                  else "guided_unshaped_drafts")
        out.setdefault(r["mode"], {})[key] = round(r["tokens_per_forward"], 4)
    return out


def format_runs(runs: list[dict]) -> str:
    lines = [f"{'mode':16s} {'guide':12s} {'drafts':9s} {'valid':>7s} {'tok/fwd':>8s} {'tok/s':>8s} {'tokens':>7s}"]
    for r in runs:
        drafts = "-" if r["mode"] not in SPEC_MODES or not r["guided"] else ("shaped" if r["guided_drafts"]
                                                                              else "unshaped")
        valid = f"{r['valid']}/{r['requests']}" if r["guided"] else "-"
        lines.append(f"{r['mode']:16s} {'json_schema' if r['guided'] else 'none':12s} {drafts:9s} {valid:>7s} "
                     f"{r['tokens_per_forward']:8.2f} {r['tokens_per_s']:8.1f} {r['tokens']:7d}")
        for problem in r.get("problems", []):
            lines.append(f"  invalid: {problem}")
    return "\n".join(lines)


def format_host(rows: list[dict]) -> str:
    lines = [f"{'mode':16s} {'requests':>8s} {'host ms':>9s} {'guided host ms':>15s} {'grammar ms/step':>16s} "
             f"{'step ms':>9s} {'guided step ms':>15s}"]
    plain = {(r["mode"], r["requests"]): r for r in rows if not r.get("guided")}
    for r in rows:
        if not r.get("guided"):
            continue
        base = plain[(r["mode"], r["requests"])]
        lines.append(f"{r['mode']:16s} {r['requests']:8d} {base['host_ms']:9.3f} {r['host_ms']:15.3f} "
                     f"{r['host_ms'] - base['host_ms']:16.3f} {base['step_ms']:9.3f} {r['step_ms']:15.3f}")
    return "\n".join(lines)
