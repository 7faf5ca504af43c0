"""Tandem's runner of Python functions: `rollout.tools: [{python: ...}]`,
`rollout.environment_factory` and `reward.functions: [{name: python, function:
...}]`, TRL's callables.

The learner runs this file with `python3 -c`:

    describe SPEC...  prints, as one JSON list, each function's tool
                      definition, the SHA-256 of the file that holds it and
                      whether it is `async def`
    load SPEC...      imports each function; prints one JSON list of
                      {"source_sha256", "async"} or {"error": ...}
    environment SPEC...
                      prints, as one JSON list, for each SPEC the tool
                      definitions of TRL's environment_factory SPEC (an
                      instance's public methods but `reset` and
                      `get_reward`), the SHA-256 of its file, the methods
                      that are `async def` and, where its instances have
                      TRL's `get_reward()`, their class's name ("reward")
    serve SPEC...     answers calls: a JSON line {"id", "function": SPEC,
                      "arguments", "text"} in (the function called with
                      the arguments as keywords), a JSON line out with
                      the same "id" (an `async def` function's answer
                      comes when it is done, the others' in order; a
                      line {"cancel": ID} cancels one in flight):
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
                      `environments` argument, and with "logs" it gets
                      TRL's `log_extra` and `log_metric` and answers
                      {"rewards", "extra", "metrics"}; {"environment_rewards": [ID
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
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import queue
import re
import sys
import threading
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


def inspect_each(answers, specs, read):
    """Writes to `answers` (the answers channel, opened before anything is
    imported), as one JSON list, `read(spec)` of each spec, or {"error"}
    where it raised."""
    described = []
    for spec in specs:
        try:
            described.append(read(spec))
        except Exception as e:
            described.append({"error": f"{type(e).__name__}: {e}"})
    answers.write(json.dumps(described))
    answers.flush()


def schema_writer():
    """TRL's tool definitions: transformers' `get_json_schema`, or
    `json_schema` below without transformers."""
    try:
        from transformers.utils import get_json_schema
    except Exception:
        return json_schema
    return get_json_schema


def describe(specs):
    answers = answers_channel()
    get_json_schema = schema_writer()

    def read(spec):
        function = load(spec)
        return {
            "definition": get_json_schema(function),
            "source_sha256": source_sha256(function),
            "async": is_async(function),
        }

    inspect_each(answers, specs, read)


def source_sha256(function):
    """What the function does is its source's: a resume compares it (of a
    `functools.partial`, its function's; of a callable instance, its
    class's)."""
    while isinstance(function, functools.partial):
        function = function.func
    if not (inspect.isroutine(function) or inspect.isclass(function)):
        function = type(function)
    with open(inspect.getsourcefile(function), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def is_async(function):
    """Whether calling `function` gives a coroutine: an `async def`
    function or method, a `functools.partial` of one, or an instance whose
    `__call__` is one (TRL's is_async_callable)."""
    while isinstance(function, functools.partial):
        function = function.func
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)
    )


def load_all(specs):
    answers = answers_channel()

    def read(spec):
        function = load(spec)
        return {"source_sha256": source_sha256(function), "async": is_async(function)}

    inspect_each(answers, specs, read)


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
    get_json_schema = schema_writer()

    def read(spec):
        factory = load(spec)
        instance = factory()
        methods = environment_methods(instance)
        if not methods:
            raise ValueError("its instances have no public method to call as a tool")
        return {
            "definitions": [get_json_schema(m) for m in methods],
            "source_sha256": source_sha256(factory),
            "reward": environment_reward(instance),
            "async_methods": [m.__name__ for m in methods if is_async(m)],
        }

    inspect_each(answers, specs, read)


def plain(value):
    """numpy and torch values as JSON: reward functions return them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__float__"):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not a number")


def text_observation(observation):
    """What `reset` returned, as the text appended to the prompt: a str, None
    (nothing), or TRL's list of content parts, whose text parts are joined
    (an image part is refused: the models here read text)."""
    if observation is None or isinstance(observation, str):
        return observation
    if isinstance(observation, list) and all(isinstance(p, dict) for p in observation):
        kinds = {p.get("type") for p in observation}
        if kinds <= {"text"}:
            return "".join(str(p.get("text", "")) for p in observation)
        raise TypeError(
            f"reset returned content parts of type {sorted(map(str, kinds - {'text'}))}: "
            "the models here read text only"
        )
    raise TypeError(f"reset returned {type(observation).__name__}, not a str, None or content parts")


def serve(specs):
    answers = answers_channel()
    # By spec: a tool and a reward function of the same name from two files
    # stay apart.
    functions = {spec: load(spec) for spec in specs}
    # Environments in use by ID, and those reset before and given back:
    # instances live on, as TRL's do, and are reset for each completion.
    environments = {}
    idle = []
    # `async def` calls run as tasks of one event loop in a thread of its
    # own, at once (as TRL gathers its async tools); the others one after
    # the other in the main thread, as TRL calls them. Each answer carries
    # its request's "id".
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    in_flight = {}
    writing = threading.Lock()

    def answer(id, text, result=None, error=None):
        if error is None:
            try:
                line = json.dumps({"id": id, "result": str(result) if text else result}, default=plain, allow_nan=False)
            except Exception as e:
                error = e
        if error is not None:
            if not text:
                # A reward function's failure stops the run: its traceback
                # goes to the log.
                traceback.print_exception(type(error), error, error.__traceback__)
            line = json.dumps({"id": id, "error": str(error) or type(error).__name__, "type": type(error).__name__})
        with writing:
            answers.write(line + "\n")
            answers.flush()

    def finished(id, text, future):
        in_flight.pop(id, None)
        if future.cancelled():
            answer(id, text, error=TimeoutError("cancelled: past its deadline"))
        elif future.exception() is not None:
            answer(id, text, error=future.exception())
        else:
            answer(id, text, future.result())

    def environment(id):
        if id not in environments:
            raise LookupError(
                f"environment {id} is gone: its Python process was replaced after a call "
                "failed (rollout.tool_timeout_s, or the process ended)"
            )
        return environments[id]

    async def wait_for(awaitable):
        return await awaitable

    def awaited(result):
        if inspect.isawaitable(result):
            return asyncio.run_coroutine_threadsafe(wait_for(result), loop).result()
        return result

    def reset(factory, items):
        observations = []
        for item in items:
            instance = idle.pop() if idle else factory()
            environments[item["environment"]] = instance
            observations.append(text_observation(awaited(instance.reset(**item["row"]))))
        return observations

    def with_logs(arguments):
        """A reward function's arguments with TRL's `log_extra(column,
        values)` and `log_metric(name, value)`, and what makes its answer
        {"rewards", "extra": {column: values}, "metrics": {name: [values]}}
        of the rewards it returns."""
        extra, metrics = {}, {}

        def cell(value):
            try:
                json.dumps(value, default=plain, allow_nan=False)
                return value
            except (TypeError, ValueError):
                return str(value)

        def log_extra(column, values):
            extra[str(column)] = [cell(v) for v in values]

        def log_metric(name, value):
            value = float(value)
            # (JSON has no NaN: null, left out of the mean.)
            metrics.setdefault(str(name), []).append(value if math.isfinite(value) else None)

        arguments["log_extra"], arguments["log_metric"] = log_extra, log_metric
        return lambda rewards: {"rewards": rewards, "extra": extra, "metrics": metrics}

    # This thread reads the calls: an `async def` one starts at once; the
    # others wait for the main thread, which runs them in order.
    work = queue.Queue()

    def read_calls():
        for line in sys.stdin:
            id = None
            text = True
            try:
                call = json.loads(line)
                id = call.get("id")
                for released in call.get("release", []):
                    if released in environments:
                        idle.append(environments.pop(released))
                if "cancel" in call:
                    # Its task answers as cancelled; nothing to answer here.
                    future = in_flight.get(call["cancel"])
                    if future is not None:
                        loop.call_soon_threadsafe(future.cancel)
                    continue
                text = call.get("text", True)
                arguments = call.get("arguments", {})
                if "reset" in call:
                    factory = functions[call["factory"]]
                    work.put((id, text, lambda factory=factory, items=call["reset"]: reset(factory, items)))
                    continue
                if "environment_rewards" in call:
                    ids, cls = call["environment_rewards"], call["class"]
                    instances = [None if id is None else environment(id) for id in ids]
                    rewards = lambda instances=instances, cls=cls: [
                        awaited(e.get_reward()) if type(e).__name__ == cls else None for e in instances
                    ]
                    work.put((id, text, rewards))
                    continue
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
                done = with_logs(arguments) if call.get("logs") else (lambda result: result)
                if is_async(function):

                    async def run(function=function, arguments=arguments, done=done):
                        return done(await function(**arguments))

                    task = asyncio.run_coroutine_threadsafe(run(), loop)
                    in_flight[id] = task
                    task.add_done_callback(lambda f, id=id, text=text: finished(id, text, f))
                else:
                    work.put((id, text, lambda f=function, a=arguments, d=done: d(awaited(f(**a)))))
            except Exception as e:
                answer(id, text, error=e)
        work.put(None)

    threading.Thread(target=read_calls, daemon=True).start()
    while (item := work.get()) is not None:
        id, text, run = item
        try:
            result = run()
        except Exception as e:
            answer(id, text, error=e)
        else:
            answer(id, text, result)


if __name__ == "__main__":
    modes = {"describe": describe, "environment": describe_environment, "load": load_all, "serve": serve}
    modes[sys.argv[1]](sys.argv[2:])
