"""Tandem's runner of Python functions: `rollout.tools: [{python: ...}]`,
`rollout.environment_factory` and `reward.functions: [{name: python, function:
...}]`, TRL's callables.

The learner runs this file with `python3 -c`:

    describe SPEC...  prints, as one JSON list, each function's tool
                      definition and the SHA-256 of the file that holds it
    load SPEC...      imports each function; prints one JSON list of
                      {"source_sha256"} or {"error": ...}
    environment SPEC...
                      prints, as one JSON list, for each SPEC the tool
                      definitions of TRL's environment_factory SPEC (an
                      instance's public methods but `reset` and
                      `get_reward`), the SHA-256 of its file and, where its
                      instances have TRL's `get_reward()`, their class's
                      name ("reward")
    serve SPEC...     answers calls: a JSON line {"function": SPEC,
                      "arguments", "text"} in (the function called with
                      the arguments as keywords), a JSON line out:
                      {"result": str(result)} with "text" (a tool's result,
                      as TRL's tool messages hold it), {"result": result}
                      without (a reward function's list), or {"error",
                      "type"}. Environments (one per completion, as TRL
                      makes one per rollout): {"reset": [{"environment": ID,
                      "row"}], "factory": SPEC} resets an idle instance (or
                      a new one) for each ID with the row's columns and
                      answers their observations; {"method", "environment":
                      ID, ...} calls a method of ID's instance; a reward
                      call's "environments": [ID or null] become its
                      `environments` argument; {"environment_rewards": [ID
                      or null], "class"} answers each instance's
                      get_reward() (null for null, or an instance of
                      another class); any line's "release": [ID] first gives
                      those instances back to the idle ones

A SPEC is `path/to/file.py:function` or `package.module:function`. Tool
definitions are TRL's: `transformers.utils.get_json_schema` when transformers
is installed, else `json_schema` below, which follows its rules (the
docstring's text before `Args:` describes the function, `Args:` each
parameter, the type hints give the types, parameters without a default are
required).
"""

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
import types
import typing

_modules = {}


def load(spec):
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"expected FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ValueError(f"no file {target!r} (from {os.getcwd()})")
        module = _modules.get(path)
        if module is None:
            # Its own folder first, so that it imports its neighbours.
            sys.path.insert(0, os.path.dirname(path))
            stem = os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules.setdefault(stem, module)
            module_spec.loader.exec_module(module)
            _modules[path] = module
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(target)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{target} has no function {name!r}")
    return function


_BASIC = {int: "integer", float: "number", str: "string", bool: "boolean"}


def type_schema(hint):
    """A type hint as JSON schema, as transformers' `_parse_type_hint`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is typing.Any:
        return {}
    if origin is None:
        if hint is type(None):
            return {"type": "null"}
        # transformers reads any other class as an object.
        return {"type": _BASIC.get(hint, "object")}
    if origin is typing.Union or origin is types.UnionType:
        subtypes = [type_schema(t) for t in args if t is not type(None)]
        if len(subtypes) == 1:
            out = subtypes[0]
        elif all(isinstance(s.get("type"), str) for s in subtypes):
            out = {"type": sorted(s["type"] for s in subtypes)}
        else:
            out = {"anyOf": subtypes}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is typing.Literal:
        kinds = sorted({_BASIC.get(type(a), "object") for a in args})
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise TypeError(f"{hint}: a tuple of one element or of any length; use list[...]")
        return {"type": "array", "prefixItems": [type_schema(t) for t in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = type_schema(args[1])
        return out
    raise TypeError(f"cannot read the type hint {hint} as JSON schema")


_SECTION_END = r"[\n\s]*(?:Returns:|Raises:|\Z)"


def json_schema(function):
    """The function's definition as `transformers.utils.get_json_schema`
    writes it."""
    name = function.__name__
    doc = (inspect.getdoc(function) or "").strip()
    if not doc:
        raise ValueError(f"{name} has no docstring: it describes the tool to the model")
    description = re.search(r"^(.*?)[\n\s]*(?:Args:|Returns:|Raises:|\Z)", doc, re.DOTALL)
    args_block = re.search(r"\n\s*Args:\n\s*(.*?)" + _SECTION_END, doc, re.DOTALL)
    returns = re.search(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(?:Raises:|\Z)", doc, re.DOTALL)
    described = {}
    if args_block:
        lines = "\n".join(line for line in args_block.group(1).strip().split("\n") if line.strip())
        pattern = r"(?:^|\n)\s*(\w+)(?:\s*\([^)]*\))?:\s*(.*?)\s*(?=\n\s*\w+(?:\s*\([^)]*\))?:|\Z)"
        for arg, text in re.findall(pattern, lines, re.DOTALL):
            described[arg] = re.sub(r"\s*\n+\s*", " ", text.strip())
    hints = typing.get_type_hints(function)
    properties = {}
    required = []
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name not in hints:
            raise ValueError(f"{name}: argument {param.name} has no type hint")
        if param.name not in described:
            raise ValueError(f"{name}: the docstring's Args: does not describe {param.name}")
        schema = type_schema(hints[param.name])
        text = described[param.name]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", text, re.IGNORECASE)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            text = text[: choices.start()].strip()
        schema["description"] = text
        properties[param.name] = schema
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out = {"name": name, "description": description.group(1).strip(), "parameters": parameters}
    if "return" in hints:
        out["return"] = type_schema(hints["return"])
        if returns:
            out["return"]["description"] = returns.group(1).strip()
    return {"type": "function", "function": out}


def answers_channel():
    """The learner reads this process's answers on stdout; what the
    functions print (at import too) goes to stderr, the learner's log."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return answers


def describe(specs):
    answers = answers_channel()
    try:
        from transformers.utils import get_json_schema
    except Exception:
        get_json_schema = json_schema
    described = []
    for spec in specs:
        try:
            function = load(spec)
            definition = get_json_schema(function)
            described.append({"definition": definition, "source_sha256": source_sha256(function)})
        except Exception as e:
            described.append({"error": f"{type(e).__name__}: {e}"})
    answers.write(json.dumps(described))
    answers.flush()


def source_sha256(function):
    """What the function does is its source's: a resume compares it."""
    with open(inspect.getsourcefile(function), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_all(specs):
    answers = answers_channel()
    loaded = []
    for spec in specs:
        try:
            loaded.append({"source_sha256": source_sha256(load(spec))})
        except Exception as e:
            loaded.append({"error": f"{type(e).__name__}: {e}"})
    answers.write(json.dumps(loaded))
    answers.flush()


def environment_methods(environment):
    """The tools of an environment, as TRL finds them: its public methods
    but the reserved `reset`, which it must have, and `get_reward`, the
    environment's own reward."""
    methods = []
    has_reset = False
    for name, member in inspect.getmembers(environment, predicate=inspect.ismethod):
        if name == "reset":
            has_reset = True
        elif name != "get_reward" and not name.startswith("_"):
            methods.append(member)
    if not has_reset:
        raise ValueError("its instances have no reset method (TRL's environment_factory needs one)")
    return methods


def environment_reward(environment):
    """The name TRL logs an environment's own reward under (its class's),
    where it has one: a `get_reward()` of no arguments, called once a
    completion is done."""
    get_reward = getattr(environment, "get_reward", None)
    if get_reward is None:
        return None
    if not callable(get_reward):
        raise TypeError("its get_reward is not a method (TRL calls get_reward() for the reward)")
    required = [
        p.name
        for p in inspect.signature(get_reward).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise TypeError(
            f"its get_reward takes {', '.join(required)}: TRL calls get_reward() with no "
            "arguments once a completion is done (read what it needs from the instance)"
        )
    return type(environment).__name__


def describe_environment(specs):
    answers = answers_channel()
    try:
        from transformers.utils import get_json_schema
    except Exception:
        get_json_schema = json_schema
    described = []
    for spec in specs:
        try:
            factory = load(spec)
            instance = factory()
            methods = environment_methods(instance)
            if not methods:
                raise ValueError("its instances have no public method to call as a tool")
            described.append({
                "definitions": [get_json_schema(m) for m in methods],
                "source_sha256": source_sha256(factory),
                "reward": environment_reward(instance),
            })
        except Exception as e:
            described.append({"error": f"{type(e).__name__}: {e}"})
    answers.write(json.dumps(described))
    answers.flush()


def plain(value):
    """numpy and torch values as JSON: reward functions return them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__float__"):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not a number")


def serve(specs):
    answers = answers_channel()
    # By spec: a tool and a reward function of the same name from two files
    # stay apart.
    functions = {spec: load(spec) for spec in specs}
    # Environments in use by ID, and those reset before and given back:
    # instances live on, as TRL's do, and are reset for each completion.
    environments = {}
    idle = []

    def environment(id):
        if id not in environments:
            raise LookupError(
                f"environment {id} is gone: its Python process was replaced after a call "
                "failed (rollout.tool_timeout_s, or the process ended)"
            )
        return environments[id]

    def awaited(result):
        return loop.run_until_complete(result) if inspect.isawaitable(result) else result

    def reset(factory, items):
        observations = []
        for item in items:
            instance = idle.pop() if idle else factory()
            environments[item["environment"]] = instance
            observation = awaited(instance.reset(**item["row"]))
            if observation is not None and not isinstance(observation, str):
                raise TypeError(f"reset returned {type(observation).__name__}, not a str or None")
            observations.append(observation)
        return observations

    loop = asyncio.new_event_loop()
    for line in sys.stdin:
        text = True
        try:
            call = json.loads(line)
            for id in call.get("release", []):
                if id in environments:
                    idle.append(environments.pop(id))
            text = call.get("text", True)
            arguments = call.get("arguments", {})
            if "reset" in call:
                result = reset(functions[call["factory"]], call["reset"])
            elif "environment_rewards" in call:
                instances = [None if id is None else environment(id) for id in call["environment_rewards"]]
                result = [
                    awaited(e.get_reward()) if type(e).__name__ == call["class"] else None
                    for e in instances
                ]
            else:
                if "method" in call:
                    function = getattr(environment(call["environment"]), call["method"])
                else:
                    function = functions[call["function"]]
                if not text and isinstance(arguments.get("trainer_state"), dict):
                    # TRL's TrainerState is read by attribute: state.global_step.
                    arguments["trainer_state"] = types.SimpleNamespace(**arguments["trainer_state"])
                if "environments" in call:
                    arguments["environments"] = [
                        None if id is None else environment(id) for id in call["environments"]
                    ]
                result = awaited(function(**arguments))
            answer = json.dumps({"result": str(result) if text else result}, default=plain, allow_nan=False)
        except Exception as e:
            if not text:
                # A reward function's failure stops the run: its traceback
                # goes to the log.
                traceback.print_exc()
            answer = json.dumps({"error": str(e) or type(e).__name__, "type": type(e).__name__})
        answers.write(answer + "\n")
        answers.flush()


if __name__ == "__main__":
    modes = {"describe": describe, "environment": describe_environment, "load": load_all, "serve": serve}
    modes[sys.argv[1]](sys.argv[2:])
