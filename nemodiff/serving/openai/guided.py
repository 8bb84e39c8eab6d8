"""Structured output and forced tool calls of the OpenAI API, as the model's guided-decoding inputs.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend: structured output]──▶ clients

What a body can ask for, turned into `guided_decoding_guide_type` / `guided_decoding_guide` (the
Triton inputs, nemodiff/serving/triton/inputs.py), at most one of:

- `response_format`: `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}}}`;
- vLLM's extra body fields `guided_json` (a schema, object or string), `guided_regex`, `guided_choice`
  (a list of strings) and `guided_grammar` (an EBNF grammar);
- `tools` with `tool_choice` naming a function or "required": the output is the function call, its
  arguments constrained by the function's parameter schema; the answer carries it as
  `message.tool_calls` with finish_reason "tool_calls", as vLLM does. "required" with several tools
  constrains the output to `{"name": one of them, "arguments": its parameters}`.

`tool_choice` "auto" (the default when tools are given) leaves the model free to call a tool or not,
which needs a chat template that renders tools and a model-specific parser of its calls: it is
refused unless the template declares tool support, and then the tools are rendered and the text is
returned as it is. Whether a schema, regex or grammar compiles is checked by the model when the
request is admitted: a bad one comes back as a 400 naming the problem.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

GUIDE_TYPE, GUIDE = "guided_decoding_guide_type", "guided_decoding_guide"


class GuideError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    """A forced tool call: how to read the constrained output back."""

    name: str | None  # the named function; None: the output names one ({"name", "arguments"})


def _schema_text(schema, param: str) -> str:
    if isinstance(schema, str):
        return schema
    if not isinstance(schema, (dict, bool)):
        raise GuideError(f"{param} must be a JSON schema (an object)", param)
    return json.dumps(schema)


def _functions(tools) -> dict[str, dict]:
    if not isinstance(tools, list) or not tools:
        raise GuideError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}", "tools")
    functions = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
            else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise GuideError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                             "\"parameters\": {...}}}", "tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise GuideError(f"the parameters of tool {function['name']!r} must be a JSON schema (an object)", "tools")
        functions[function["name"]] = parameters
    return functions


def guide_fields(body: dict, template_has_tools: bool, chat: bool) -> tuple[dict, ToolCall | None, list | None]:
    """(the guided-decoding inputs, the forced tool call to read back or None, the tools to render in
    the chat template or None); GuideError for what cannot be served."""
    asked = []
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                         "json_schema"):
            raise GuideError('structured output: response_format must be {"type": "text"}, {"type": "json_object"} or '
                             '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}', "response_format")
        if response_format["type"] == "json_object":
            asked.append(("response_format", "json", ""))
        elif response_format["type"] == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise GuideError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                                 "response_format")
            asked.append(("response_format", "json_schema", _schema_text(spec["schema"], "response_format")))
    if body.get("guided_json") is not None:
        asked.append(("guided_json", "json_schema", _schema_text(body["guided_json"], "guided_json")))
    for name, kind in (("guided_regex", "regex"), ("guided_grammar", "ebnf_grammar")):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise GuideError(f"{name} must be a non-empty string", name)
            asked.append((name, kind, value))
    if body.get("guided_choice") is not None:
        choices = body["guided_choice"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise GuideError("guided_choice must be a non-empty list of non-empty strings", "guided_choice")
        asked.append(("guided_choice", "choice", json.dumps(choices)))
    tool, render = None, None
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and choice != "none":
        if not chat:
            raise GuideError("tools are for /v1/chat/completions", "tools")
        functions = _functions(tools)
        if choice is None or choice == "auto":
            if not template_has_tools:
                raise GuideError('tool_choice "auto" needs a chat template that declares tool support, and this '
                                 'model\'s does not; name a function in tool_choice, or use "required"',
                                 "tool_choice")
            render = tools
        elif choice == "required":
            if len(functions) == 1:
                (name, parameters), = functions.items()
                tool = ToolCall(name)
                asked.append(("tool_choice", "json_schema", json.dumps(parameters)))
            else:
                tool = ToolCall(None)
                asked.append(("tool_choice", "json_schema", json.dumps({"anyOf": [
                    {"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                     "required": ["name", "arguments"]} for n, p in functions.items()]})))
        else:
            name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
            if name not in functions:
                raise GuideError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                                 f'"function": {{"name": one of {sorted(functions)}}}}}', "tool_choice")
            tool = ToolCall(name)
            asked.append(("tool_choice", "json_schema", json.dumps(functions[name])))
        render = render if render is not None else (tools if template_has_tools else None)
    if len(asked) > 1:
        raise GuideError(f"ask for one kind of structured output at a time (got {', '.join(a[0] for a in asked)})",
                         asked[1][0])
    fields = {GUIDE_TYPE: asked[0][1], GUIDE: asked[0][2]} if asked else {}
    return fields, tool, render


def tool_calls(tool: ToolCall, text: str, truncated: bool = False) -> list[dict]:
    """The `tool_calls` of a message whose text is the forced call's constrained output. A call cut short by
    max_tokens (`truncated`) is returned as OpenAI returns one: the function's name and the arguments as far as
    they were written (not valid JSON), with finish_reason "length"; under "required" with several functions,
    only once the output has named the function (before that: no call, the text stays the content)."""
    name, arguments = tool.name, text
    if name is None:
        try:
            call = json.loads(text)
            name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
        except (ValueError, KeyError, TypeError):
            named = _NAMED_CALL.match(text) if truncated else None
            if named is None:  # no valid call to return
                return []
            try:
                name, arguments = json.loads(f'"{named.group(1)}"'), text[named.end():]
            except ValueError:
                return []
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}}]


# the start of a "required" call's output, {"name": "...", "arguments": ..., once its name is complete
_NAMED_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
