"""The official `openai` client against a running rollout server.

Run by rollout-server/tests/python_client.rs, which starts the server and sets
TANDEM_BASE_URL (http://host:port/v1), TANDEM_API_KEY and TANDEM_MODEL.
Standalone: python tests/python/test_openai_client.py after exporting those.
Exits non-zero on the first failed check.
"""

import json
import os
import sys

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def completions_with_n_and_logprobs(client, model):
    r = client.completions.create(
        model=model,
        prompt=["1+1=", "2+2="],
        n=3,
        max_tokens=5,
        logprobs=2,
        seed=1,
        extra_body={"ignore_eos": True, "return_token_ids": True, "client_tag": "rank-0"},
    )
    check(r.object == "text_completion", "completions object")
    check(len(r.choices) == 6, "2 prompts x n=3 give 6 choices")
    check([c.index for c in r.choices] == list(range(6)), "choice index = prompt_index * n + j")
    for c in r.choices:
        lp = c.logprobs
        check(len(lp.tokens) == 5 and len(lp.token_logprobs) == 5, "5 tokens with log-probs")
        check(len(lp.text_offset) == 5, "text offsets")
        check(all(2 <= len(t) <= 3 for t in lp.top_logprobs), "top-2 plus the sampled token")
        check(all(x <= 0 for x in lp.token_logprobs), "log-probs are <= 0")
        extra = c.model_extra or {}
        check(len(extra.get("token_ids", [])) == 5, "token_ids with return_token_ids")
        check(extra.get("metadata", {}).get("client_tag") == "rank-0", "client_tag echoed")
    check(r.usage.completion_tokens == 30, "usage counts every choice")


def chat_streaming(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    content, roles, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            content += ch.delta.content or ""
    check(roles == ["assistant"], "first chunk carries the role")
    check(usage is not None and usage.completion_tokens == 6, "final usage chunk")
    check(isinstance(content, str), "streamed content")


def tool_call_and_json_schema(client, model):
    tools = [{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                       "required": ["city"]}}}]
    named = dict(
        model=model,
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=150,
        seed=5,
    )
    r = client.chat.completions.create(**named)
    calls = r.choices[0].message.tool_calls
    check(calls and calls[0].type == "function", "a named tool_choice returns a tool call")
    check(calls[0].function.name == "get_weather", "the call names the function")
    check("city" in json.loads(calls[0].function.arguments), "its arguments are JSON")
    # Streamed, the client's delta types parse every piece of the call.
    stream = client.chat.completions.create(**named, stream=True)
    name, arguments = None, ""
    for chunk in stream:
        for ch in chunk.choices:
            for call in ch.delta.tool_calls or []:
                check(call.index == 0, "one call, index 0")
                if call.function and call.function.name:
                    name = call.function.name
                arguments += (call.function.arguments or "") if call.function else ""
    check(name == "get_weather", "the streamed call names the function")
    check(arguments == calls[0].function.arguments, "streamed arguments join to the whole call's")
    # "auto": the server runs with --enable-auto-tool-choice --tool-call-parser
    # hermes; a guided regex makes the model write one hermes call.
    hermes = (r'<tool_call>\n\{"name": "get_weather", "arguments": '
              r'\{"city": "[a-z]{1,6}"\}\}\n</tool_call>')
    for stream in (False, True):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "weather?"}],
            tools=tools,
            max_tokens=150,
            seed=5,
            stream=stream,
            extra_body={"guided_regex": hermes},
        )
        if stream:
            got, finish = {}, None
            for chunk in r:
                for ch in chunk.choices:
                    finish = ch.finish_reason or finish
                    for call in ch.delta.tool_calls or []:
                        got.setdefault(call.index, [call.id, call.function.name, ""])
                        got[call.index][2] += call.function.arguments or ""
            calls = [(name, args) for _, name, args in got.values()]
        else:
            finish = r.choices[0].finish_reason
            calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
        check(finish == "tool_calls", f"auto tool choice finishes with tool_calls (stream={stream})")
        check(len(calls) == 1 and calls[0][0] == "get_weather", f"one parsed call (stream={stream})")
        check(json.loads(calls[0][1])["city"].isalpha(), f"its arguments are JSON (stream={stream})")
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "json?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": {
            "type": "object", "properties": {"answer": {"type": "integer"}},
            "required": ["answer"]}}},
        max_tokens=150,
        seed=5,
    )
    check(isinstance(json.loads(r.choices[0].message.content)["answer"], int),
          "response_format json_schema gives JSON of the schema")


def error_case(client, model):
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model is 404")
        check("does not exist" in str(e), "404 message")
    else:
        raise AssertionError("unknown model was accepted")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=1, temperature=-1)
    except openai.BadRequestError as e:
        check(e.status_code == 400, "out-of-range temperature is 400")
    else:
        raise AssertionError("temperature -1 was accepted")
    bad_key = OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    try:
        bad_key.models.list()
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "wrong API key is 401")
    else:
        raise AssertionError("wrong API key was accepted")


def main():
    base_url = os.environ["TANDEM_BASE_URL"]
    api_key = os.environ.get("TANDEM_API_KEY", "EMPTY")
    model = os.environ["TANDEM_MODEL"]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    models = client.models.list()
    check([m.id for m in models.data] == [model], "models list")
    completions_with_n_and_logprobs(client, model)
    chat_streaming(client, model)
    tool_call_and_json_schema(client, model)
    error_case(client, model)
    print(f"python openai {openai.__version__}: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
