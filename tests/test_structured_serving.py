"""Structured output through the servers: Triton's guided-decoding inputs and the OpenAI API.

One `nemodiff serve --openai-port` process: Triton's generate endpoint takes
`guided_decoding_guide_type`/`guided_decoding_guide` and answers what the LLM answers; the OpenAI
API takes response_format, vLLM's guided_* fields and forced tool calls; a bad guide is a 400
naming the problem at both, and the server goes on.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
from triton_helpers import module_server

from nemodiff import SamplingParams
from nemodiff.runtime.request import Guide

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
             "required": ["zone"]}}}]


@pytest.fixture(scope="module")
def server(served_engine, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    yield from module_server(served_engine, logs)
    assert "Traceback" not in (logs / "serve.log").read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("mode", ["ar", "quadratic-spec", "diffusion"])
def test_triton_guided_inputs_equal_the_llm(server, served_llm, mode):
    want = served_llm.generate("the cat", SamplingParams(max_new_tokens=24, mode=mode, block_length=4,
                                                         guide=Guide("regex", "[a-z]{3,8}-[0-9]{2}")))[0]
    status, body = server.generate({"text_input": "the cat", "max_tokens": 24, "decode_mode": mode,
                                    "block_length": 4, "guided_decoding_guide_type": "regex",
                                    "guided_decoding_guide": "[a-z]{3,8}-[0-9]{2}"})
    assert status == 200, body
    assert body["text_output"] == want.text and re.fullmatch("[a-z]{3,8}-[0-9]{2}", want.text)
    status, body = server.generate({"text_input": "the cat", "max_tokens": 8, "guided_decoding_guide_type": "choice",
                                    "guided_decoding_guide": json.dumps(["left", "right"])})
    assert status == 200 and body["text_output"] in ("left", "right")


@pytest.mark.parametrize("fields, message", [
    ({"guided_decoding_guide_type": "regex", "guided_decoding_guide": "[a-"}, "invalid regular expression"),
    ({"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": '{"type": "nope"}'},
     'Unsupported type "nope"'),
    ({"guided_decoding_guide_type": "choice", "guided_decoding_guide": "yes"}, "must be a JSON list"),
    ({"guided_decoding_guide_type": "xml", "guided_decoding_guide": "x"}, "must be one of"),
    ({"guided_decoding_guide": "[a-z]"}, "needs guided_decoding_guide_type"),
])
def test_triton_bad_guide_is_invalid_arg(server, fields, message):
    status, body = server.generate({"text_input": "the cat", "max_tokens": 8} | fields)
    assert status == 400 and message in body["error"], body
    assert server.generate({"text_input": "the cat", "max_tokens": 3})[0] == 200


def test_a_huge_schema_is_400_and_stalls_nobody(client, server):
    """A schema of 10,000 optional properties (which xgrammar would take minutes and gigabytes to compile) is
    a 400 naming the limit at both ports, and three plain requests sent meanwhile each finish in under 3 s;
    so do 100,000 choices and 2,000 forced tools."""
    import threading
    import time

    huge = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)}}
    errors = []

    def attack():
        try:
            client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=8, response_format={
                                               "type": "json_schema", "json_schema": {"name": "h", "schema": huge}})
        except openai.BadRequestError as exc:
            errors.append(str(exc))

    attacker = threading.Thread(target=attack)
    attacker.start()
    for i in range(3):
        started = time.monotonic()
        assert client.completions.create(model="nemodiff", prompt=f"plain {i}", max_tokens=4).choices[0].text is not None
        assert time.monotonic() - started < 3.0
    attacker.join(30)
    assert errors and "10000 properties; the limit is 1024 (max_properties)" in errors[0]
    status, body = server.generate({"text_input": "the cat", "max_tokens": 8, "guided_decoding_guide_type": "json_schema",
                                    "guided_decoding_guide": json.dumps(huge)})
    assert status == 400 and "(max_properties)" in body["error"], body
    with pytest.raises(openai.BadRequestError, match=r"100000 choices; the limit is 4096 \(max_alternatives\)"):
        client.completions.create(model="nemodiff", prompt="pick", max_tokens=4,
                                  extra_body={"guided_choice": [f"c{i}" for i in range(100_000)]})
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}} for i in range(5000)]
    with pytest.raises(openai.BadRequestError, match=r"the limit is 4096 \(max_alternatives\)"):
        client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       tools=tools, tool_choice="required")


def test_openai_response_format_and_guided_fields(client):
    chat = [{"role": "user", "content": "where to?"}]
    reply = client.chat.completions.create(model="nemodiff", messages=chat, max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
    value = json.loads(reply.choices[0].message.content)
    assert value["city"] in ("Paris", "Oslo", "Lima") and 1 <= value["days"] <= 9
    reply = client.chat.completions.create(model="nemodiff", messages=chat, max_tokens=40,
                                           response_format={"type": "json_object"})
    content = reply.choices[0].message.content  # a random model may write one long key: cut by max_tokens
    assert content.startswith("{") and (reply.choices[0].finish_reason == "length" or json.loads(content))
    reply = client.completions.create(model="nemodiff", prompt="pick", max_tokens=8,
                                      extra_body={"guided_choice": ["red", "green"], "decode_mode": "linear-spec"})
    assert reply.choices[0].text in ("red", "green") and reply.choices[0].finish_reason == "stop"
    reply = client.completions.create(model="nemodiff", prompt="a code", max_tokens=12,
                                      extra_body={"guided_regex": "[A-Z]{2}[0-9]{3}"})
    assert re.fullmatch("[A-Z]{2}[0-9]{3}", reply.choices[0].text)
    reply = client.completions.create(model="nemodiff", prompt="sum", max_tokens=12,
                                      extra_body={"guided_grammar": 'root ::= [0-9] "+" [0-9]'})
    assert re.fullmatch(r"[0-9]\+[0-9]", reply.choices[0].text)


def test_openai_forced_tool_calls(client):
    chat = [{"role": "user", "content": "weather?"}]
    reply = client.chat.completions.create(model="nemodiff", messages=chat, max_tokens=40, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call, = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo", "Lima")
    reply = client.chat.completions.create(model="nemodiff", messages=chat, max_tokens=120, tools=TOOLS,
                                           tool_choice="required")
    call, = reply.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments), dict)
    stream = client.chat.completions.create(model="nemodiff", messages=chat, max_tokens=40, tools=TOOLS, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].tool_calls[0].function.name == "get_time"
    assert json.loads(deltas[0].tool_calls[0].function.arguments)["zone"] in ("UTC", "CET")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    for stream in (False, True):  # cut by max_tokens: as OpenAI answers, the call so far and "length"
        reply = client.chat.completions.create(model="nemodiff", messages=chat, max_tokens=3, tools=TOOLS, stream=stream,
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
        if stream:
            chunks = list(reply)
            call = next(c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls).tool_calls[0]
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content is None
            call = reply.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and call.function.arguments.startswith("{")


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     'invalid JSON schema: Unsupported type "nope"'),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "invalid regular expression"),
    ({"tools": TOOLS}, 'tool_choice "auto" needs a chat template that declares tool support'),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice must be"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "one kind of structured"),
])
def test_openai_bad_guides_are_400(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)) as bad:
        client.chat.completions.create(model="nemodiff", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       **extra)
    assert bad.value.status_code == 400 and bad.value.body["message"]


def test_guide_fields_read_every_form():
    """The OpenAI body's forms of structured output, read without a server."""
    from nemodiff.serving.openai.guided import GuideError, guide_fields, tool_calls

    assert guide_fields({}, False, True) == ({}, None, None)
    assert guide_fields({"response_format": {"type": "text"}}, False, True)[0] == {}
    fields, _, _ = guide_fields({"guided_json": SCHEMA}, False, False)
    assert fields == {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": json.dumps(SCHEMA)}
    assert guide_fields({"guided_choice": ["a", "b"]}, False, False)[0]["guided_decoding_guide"] == '["a", "b"]'
    fields, tool, render = guide_fields({"tools": TOOLS, "tool_choice": "auto"}, True, True)
    assert fields == {} and tool is None and render == TOOLS  # a template with tools renders them
    fields, tool, render = guide_fields({"tools": TOOLS, "tool_choice": "none"}, False, True)
    assert fields == {} and tool is None and render is None
    _, tool, _ = guide_fields({"tools": TOOLS[:1], "tool_choice": "required"}, False, True)
    assert tool.name == "get_weather"
    _, tool, _ = guide_fields({"tools": TOOLS, "tool_choice": "required"}, False, True)
    call, = tool_calls(tool, '{"name": "get_time", "arguments": {"zone": "UTC"}}')
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert tool_calls(tool, '{"name": "get_ti') == [] == tool_calls(tool, '{"name": "get_ti', truncated=True)
    call, = tool_calls(tool, '{"name": "get_time", "arguments": {"zo', truncated=True)  # cut by max_tokens
    assert call["function"] == {"name": "get_time", "arguments": '{"zo'}
    for body in ({"tools": TOOLS}, {"guided_regex": ""}, {"guided_choice": "a"}, {"tools": [{"type": "function"}]},
                 {"response_format": {"type": "json_schema"}}, {"guided_json": 5}):
        with pytest.raises(GuideError):
            guide_fields(body, False, True)
    with pytest.raises(GuideError, match="for /v1/chat/completions"):
        guide_fields({"tools": TOOLS, "tool_choice": "required"}, False, False)
