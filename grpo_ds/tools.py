"""Tools and environments for agent rollouts, with TRL's conventions: loading `module:function` tools and a
`module:Class` environment, their JSON schemas, rendering the schemas and the tool results through the chat template,
parsing the model's tool calls, executing them safely, and the built-in calculator. Pure: no DeepSpeed, no
torch.distributed; the rollout loop that alternates decoding and tool calls is generation.py's.

A tool is a plain Python function with type hints and a Google docstring, as TRL and transformers'
`get_json_schema` take it (the model reads the schema: name, description, arguments). An environment is a class
whose public methods are the tools of one rollout (one instance per completion), with `reset(**columns)` called
before each rollout (it may return text, appended to the prompt's last user turn) and, optionally, `get_reward()`
scoring the episode (an extra reward term named after the class, weight 1, as TRL).

The text format (docs/AGENTS.md), used where the chat template does not render tools (SmolLM2's): the Hermes/Qwen
convention. The tool schemas go to the system turn inside <tools></tools>; the model calls a tool with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and ends its turn; each result comes back as a `tool`
turn holding `<tool_response>result</tool_response>`, then a new assistant turn opens. Templates that render tools
(`apply_chat_template(..., tools=...)`, Qwen2.5's) get the schemas and results their own way; the model's calls are
parsed from the same <tool_call> tags.

Failures never end a run: a tool that raises, outlives its time limit, returns something that is not text, is
called with bad arguments or under an unknown name, or a call that is not valid JSON, gives the model
`Error: <why>` as its result and is counted in `tool_errors`.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import json
import math
import operator
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# ----------------------------------------------------------------------------- loading


def load_object(spec: str, flag: str) -> Any:
    """The object named by "package.module:name", looked up on sys.path and then in the current directory; a bad
    spec raises ValueError with one line naming the flag.

    >>> load_object("grpo_ds.tools:calculator", "--tools").__name__
    'calculator'
    >>> load_object("calculator", "--tools")
    Traceback (most recent call last):
    ...
    ValueError: --tools 'calculator': expected module:function (e.g. grpo_ds.tools:calculator)
    """
    module_name, _, name = spec.partition(":")
    if not module_name or not name or ":" in name:
        example = "mypackage.envs:Game" if flag == "--environment" else "grpo_ds.tools:calculator"
        what = "module:Class" if flag == "--environment" else "module:function"
        raise ValueError(f"{flag} {spec!r}: expected {what} (e.g. {example})")
    return import_callable(spec, flag)


def import_callable(spec: str, flag: str, noun: str = "attribute") -> Any:
    """The callable of a well-formed "module:name" spec (the one loader of --tools, --environment and --reward
    functions): the module is looked up on sys.path and then in the current directory, as `python -m` would; an
    import failure, a missing name or a value that is not callable raises ValueError with one line naming `flag`
    (`noun` names what was missing)."""
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import failure (missing, SyntaxError, error at import time) is a bad flag
        detail = " ".join(f"{type(e).__name__}: {e}".split())  # one line even for multi-line messages
        raise ValueError(f"{flag} {spec!r}: cannot import module {module_name!r} ({detail})") from e
    if not hasattr(module, name):
        raise ValueError(f"{flag} {spec!r}: module {module_name!r} has no {noun} {name!r}")
    value = getattr(module, name)
    if not callable(value):
        raise ValueError(f"{flag} {spec!r}: {module_name}.{name} is not callable (it is a {type(value).__name__})")
    return value


def tool_schema(fn: Callable, flag: str, spec: str) -> dict:
    """The JSON schema the model sees for `fn`, by transformers' get_json_schema (type hints and a Google
    docstring, as TRL requires); a function it cannot read is refused with one line naming the flag."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # TypeHintParsingException, DocstringParsingException: say which, in one line
        detail = " ".join(str(e).split())
        raise ValueError(f"{flag} {spec!r}: {getattr(fn, '__name__', fn)} cannot be a tool: {detail} (a tool needs "
                         f"type hints on every argument and a Google docstring with an Args section)") from e


def environment_methods(environment: object) -> list[Callable]:
    """An environment's tools, as TRL finds them: the public functions of its class other than reset and
    get_reward, bound to the instance (listed on the class, so that properties are not evaluated)."""
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


def _call_reset(environment: object, columns: dict) -> Optional[str]:
    """reset() with the dataset row's columns it takes by name (all of them for **kwargs; TRL passes the row)."""
    parameters = inspect.signature(environment.reset).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        kwargs = dict(columns)
    else:
        kwargs = {p.name: columns[p.name] for p in parameters if p.name in columns
                  and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    observation = environment.reset(**kwargs)
    return None if observation is None else str(observation)


# ----------------------------------------------------------------------------- the model's calls


@dataclass(frozen=True)
class ToolCall:
    name: Optional[str]
    arguments: Optional[dict]
    error: Optional[str] = None  # why the call could not be read (then it is answered with this error)


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
MAX_CALLS_PER_TURN = 8  # more calls in one turn are answered with an error each


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The calls in one model turn, in the Hermes/Qwen format: a JSON object with "name" and "arguments" (an
    object, or a string holding one) inside each <tool_call></tool_call>. A call that cannot be read is kept
    with its error, so the model is told why; a <tool_call> never closed counts as such a call.

    >>> parse_tool_calls('Let me add.<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    [ToolCall(name='add', arguments={'a': 1}, error=None)]
    >>> parse_tool_calls("<tool_call>{oops}</tool_call>")[0].error
    'the tool call is not valid JSON (Expecting property name enclosed in double quotes)'
    >>> parse_tool_calls("no call here")
    []
    """
    calls = []
    matches = list(TOOL_CALL.finditer(text))
    for match in matches:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, None, f"the tool call is not valid JSON ({e.msg})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(ToolCall(None, None, 'a tool call is a JSON object with a "name" and "arguments"'))
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(call["name"], None, '"arguments" must be a JSON object'))
            continue
        calls.append(ToolCall(call["name"], arguments))
    if text.count("<tool_call>") > len(matches):
        calls.append(ToolCall(None, None, "a <tool_call> was opened and never closed with </tool_call>"))
    return calls


# ----------------------------------------------------------------------------- executing a call

MAX_RESULT_CHARS = 2000  # a longer result is cut, and says so


def run_tool(fn: Callable, arguments: dict, timeout: float) -> tuple[str, Optional[str]]:
    """(the result as the model sees it, None) or ("Error: why", why). The call runs in a daemon thread joined
    for `timeout` seconds: one that outlives it is abandoned (Python cannot kill a thread; it keeps running in the
    background and cannot delay the exit) and the model is told it timed out. Arguments are bound to the signature
    first, so a wrong name or a missing argument is an error message, not an exception. A result must be text (a
    number or bool is written as text, as TRL's str() does); None, bytes, lists and other objects are errors.

    >>> run_tool(lambda a, b: a + b, {"a": 2, "b": 3}, 1.0)
    ('5', None)
    >>> run_tool(lambda a: a, {"b": 1}, 1.0)[1]
    "bad arguments (missing a required argument: 'a')"
    >>> run_tool(lambda: [1], {}, 1.0)[0]
    'Error: returned list, not text'
    """
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as e:
        return _error(f"bad arguments ({e})")
    except ValueError:  # no signature (a builtin): let the call say
        pass
    box: dict = {}

    def call() -> None:
        try:
            value = fn(**arguments)
            if inspect.iscoroutine(value):  # an async tool, as TRL allows
                value = asyncio.run(value)
            box["value"] = value
        except BaseException as e:  # noqa: BLE001 - SystemExit included: a tool never ends the run
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True, name=f"tool-{getattr(fn, '__name__', 'call')}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _error(f"timed out after {timeout:g} s")
    if "error" in box:
        error = box["error"]
        return _error(" ".join(f"{type(error).__name__}: {error}".split())[:500])
    value = box["value"]
    if isinstance(value, (bool, int, float)):
        value = str(value)
    if not isinstance(value, str):
        return _error(f"returned {type(value).__name__}, not text")
    if len(value) > MAX_RESULT_CHARS:
        value = value[:MAX_RESULT_CHARS] + f" [cut at {MAX_RESULT_CHARS} characters]"
    return value, None


def _error(why: str) -> tuple[str, str]:
    return f"Error: {why}", why


# ----------------------------------------------------------------------------- rendering

TOOL_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{schemas}\n</tools>\n\nFor each function call, return a "
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def tool_instructions(schemas: list[dict]) -> str:
    """The text format's system block (Qwen2.5's own wording): the schemas, one JSON object a line, and how to call.

    >>> print(tool_instructions([{"type": "function", "function": {"name": "f"}}]).splitlines()[6])
    {"type": "function", "function": {"name": "f"}}
    """
    return TOOL_INSTRUCTIONS.format(schemas="\n".join(json.dumps(s) for s in schemas))


def renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders tool schemas itself (apply_chat_template(..., tools=...)): a probe tool's
    name must appear in its output."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    probe = {"type": "function", "function": {"name": "grpo_ds_probe_tool", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[probe], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that fails on tools does not support them
        return False
    return "grpo_ds_probe_tool" in text


def with_tool_instructions(messages: list[dict], schemas: list[dict]) -> list[dict]:
    """The conversation with the text format's block at the end of its system turn (a system turn is added when
    there is none).

    >>> [m["role"] for m in with_tool_instructions([{"role": "user", "content": "hi"}], [])]
    ['system', 'user']
    """
    block = tool_instructions(schemas)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


class ToolFormat:
    """How one tokenizer's chat template frames tool results: the tokens that follow a model turn that called
    tools (the end of its turn's line, the tool turn(s), the next assistant turn's opening and the response prefix).
    Found as TRL finds them: render a short conversation up to an assistant turn that called the tools and the same
    conversation with the results and a new generation prompt; the tokens after the first one's last EOS are the
    suffix. Templates that render tools get the results as `tool` messages; the text format wraps them in
    <tool_response></tool_response> (in a `user` turn where the template refuses a `tool` role)."""

    def __init__(self, tokenizer: Any, response_prefix: str = "", turn_prefix: Optional[str] = None):
        self.tokenizer = tokenizer
        self.native = renders_tools(tokenizer)
        self.response_prefix = response_prefix  # the first model turn's opening (part of the prompt)
        self.turn_prefix = response_prefix if turn_prefix is None else turn_prefix  # each later turn's
        self.plain = getattr(tokenizer, "chat_template", None) is None
        self.role = "tool"
        if not self.native and not self.plain:
            try:
                self._suffix_text([ToolCall("probe", {})], ["x"])
            except Exception:  # noqa: BLE001 - e.g. "roles must alternate user/assistant"
                self.role = "user"

    def decode(self, ids: list[int]) -> str:
        """A model turn's text (its ending EOS excluded by the caller), special tokens kept: a tool-call tag may be
        one."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def result_message(self, name: str, result: str) -> dict:
        if self.native:
            return {"role": "tool", "name": name, "content": result}
        return {"role": self.role, "name": name, "content": f"<tool_response>\n{result}\n</tool_response>"}

    def call_message(self, text: str, calls: list[ToolCall]) -> dict:
        """A model turn that called tools, as a chat message: `text` (what it wrote before the calls) and the calls,
        in the template's `tool_calls` field where it renders tools, else as <tool_call> tags after the text. The
        server renders an OpenAI client's assistant message with `tool_calls` here, as training frames a turn."""
        if self.native:
            return {"role": "assistant", "content": text, "tool_calls": [
                {"type": "function", "function": {"name": c.name or "unknown", "arguments": c.arguments or {}}}
                for c in calls]}
        return {"role": "assistant", "content": text + "".join(
            f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments or {}})}\n</tool_call>"
            for c in calls)}

    def _suffix_text(self, calls: list[ToolCall], results: list[str]) -> str:
        tool_messages = [self.result_message(c.name or "unknown", r) for c, r in zip(calls, results)]
        if self.plain:  # no chat template: render_chat's plain transcript
            turns = "".join(f"\n{m['role'].capitalize()}: {m['content']}" for m in tool_messages)
            return f"{turns}\nAssistant:{self.turn_prefix}"
        head = [{"role": "user", "content": "dummy"}, self.call_message("", calls)]
        prefix = self.tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=False)
        full = self.tokenizer.apply_chat_template(head + tool_messages, tokenize=False, add_generation_prompt=True)
        eos = self.tokenizer.eos_token
        if eos and eos in prefix:  # the model's turn ends at its EOS; what the template adds after it is suffix
            prefix = prefix[:prefix.rindex(eos) + len(eos)]
        if not full.startswith(prefix):
            raise ValueError("the chat template does not render a conversation as an extension of its beginning, "
                             "so tool results cannot be appended to a model turn")
        return full[len(prefix):] + self.turn_prefix

    def opening(self, turn: int) -> str:
        """The text model turn `turn` (0: the first) starts with, written by the prompt or the framing rather than
        the model: what a call in that turn is read with (a prefix may open the call)."""
        return self.response_prefix if turn == 0 else self.turn_prefix

    def frame(self, messages: list[dict]) -> list[dict]:
        """A conversation written in OpenAI's form (an assistant message with `tool_calls`, each
        {"function": {"name", "arguments"}}, arguments an object or JSON text; `tool` messages with a `name` and
        the result as `content`), framed as training frames a model turn that called tools and the results
        (call_message, result_message). Other messages pass unchanged."""
        framed = []
        for m in messages:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = []
                for call in m["tool_calls"]:
                    function = call.get("function", call)
                    arguments = function.get("arguments") or {}
                    calls.append(ToolCall(function.get("name"),
                                          json.loads(arguments) if isinstance(arguments, str) else arguments))
                framed.append(self.call_message(m.get("content") or "", calls))
            elif m.get("role") == "tool":
                framed.append(self.result_message(m.get("name") or "unknown", m.get("content") or ""))
            else:
                framed.append(m)
        return framed

    def suffix_ids(self, calls: list[ToolCall], results: list[str]) -> list[int]:
        return self.tokenizer(self._suffix_text(calls, results), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- the toolbox and one rollout


@dataclass
class Toolbox:
    """The run's tools, built once from --tools and --environment before any model loads."""

    functions: list[Callable] = field(default_factory=list)
    environment: Optional[Callable] = None  # the class (or any factory) of one rollout's environment
    timeout: float = 10.0
    max_iterations: Optional[int] = None  # tool-calling rounds per episode (None: until the budget)
    schemas: list[dict] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # every tool's name, standalone ones first
    has_reward: bool = False
    pool: list = field(default_factory=list)  # environment instances, reused (reset) rollout after rollout

    @classmethod
    def from_flags(cls, tools: str = "", environment: str = "", timeout: float = 10.0,
                   max_iterations: Optional[int] = None) -> Optional["Toolbox"]:
        """None when neither flag is given. Every tool is loaded and its schema read now; the environment is
        instantiated once (TRL probes it likewise), so a bad flag is one line before any model loads."""
        specs = [s.strip() for s in tools.split(",") if s.strip()] if tools else []
        if not specs and not environment:
            return None
        box = cls(timeout=timeout, max_iterations=max_iterations)
        for spec in specs:
            fn = load_object(spec, "--tools")
            box.schemas.append(tool_schema(fn, "--tools", spec))
            box.functions.append(fn)
        box.names = [s["function"]["name"] for s in box.schemas]
        if environment:
            factory = load_object(environment, "--environment")
            try:
                instance = factory()
            except Exception as e:  # noqa: BLE001 - reported as a bad flag
                raise ValueError(f"--environment {environment!r}: {getattr(factory, '__name__', factory)}() raised "
                                 f"{type(e).__name__}: {' '.join(str(e).split())}") from e
            if not callable(getattr(instance, "reset", None)):
                raise ValueError(f"--environment {environment!r}: {type(instance).__name__} has no reset() method "
                                 f"(called before every rollout; it may return text for the prompt)")
            methods = environment_methods(instance)
            if not methods and not specs:
                raise ValueError(f"--environment {environment!r}: {type(instance).__name__} has no public method "
                                 f"to offer as a tool")
            for method in methods:
                schema = tool_schema(method, "--environment", environment)
                if schema["function"]["name"] in box.names:
                    raise ValueError(f"--environment {environment!r}: its method {schema['function']['name']!r} "
                                     f"has the name of a --tools function")
                box.schemas.append(schema)
                box.names.append(schema["function"]["name"])
            box.environment, box.pool = factory, [instance]
            box.has_reward = callable(getattr(instance, "get_reward", None))
        if len(set(box.names)) != len(box.names):
            raise ValueError(f"--tools {tools!r}: two tools share a name ({', '.join(box.names)})")
        return box

    @property
    def environment_name(self) -> str:
        return type(self.pool[0]).__name__ if self.pool else ""

    def worked_example(self, question: str, tool_turn: str, answer: str) -> list[dict]:
        """The turns of a worked example that calls tools (--example_tool_call), in OpenAI's form (ToolFormat.frame
        renders them as rollouts frame a call): the question, the assistant's turn with its calls (the text before
        the first <tool_call> kept as its content), one `tool` message per call holding what the tool answers now,
        and the final `answer`. The results are computed, never written by hand, so the example cannot show a tool
        answering what it would not. A call that cannot be read, names no --tools function, or is answered with an
        error is refused in one line."""
        calls = parse_tool_calls(tool_turn)
        if not calls:
            raise ValueError(f"--example_tool_call {tool_turn!r}: no <tool_call>{{\"name\": ..., \"arguments\": "
                             f"{{...}}}}</tool_call> in it")
        functions = {fn.__name__: fn for fn in self.functions}
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": tool_turn[:tool_turn.index("<tool_call>")],
                     "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                    for c in calls]}]
        for call in calls:
            if call.error is not None:
                raise ValueError(f"--example_tool_call: {call.error}")
            if call.name not in functions:
                raise ValueError(f"--example_tool_call: calls {call.name!r}, which is not a --tools function "
                                 f"({', '.join(functions) or 'none'}; an environment's methods need its state)")
            result, error = run_tool(functions[call.name], call.arguments, self.timeout)
            if error is not None:
                raise ValueError(f"--example_tool_call: {call.name}({json.dumps(call.arguments)}) answered {result!r}")
            messages.append({"role": "tool", "name": call.name, "content": result})
        return messages + [{"role": "assistant", "content": answer}]

    def session(self, columns: list[dict], fmt: ToolFormat,
                parser: Callable[[str], list[ToolCall]] = parse_tool_calls) -> "Session":
        """One rollout's episodes, one per row (columns: each row's dataset columns, for reset)."""
        while self.environment is not None and len(self.pool) < len(columns):
            self.pool.append(self.environment())
        return Session(self, columns, fmt, parser)

    def reward(self, environments: list, **kwargs) -> list[float]:
        """The environment's own reward term (TRL's get_reward, weight 1), batched: a get_reward that raises or
        returns a non-number scores NaN, which the rewards count as an error (scored 0)."""
        values = []
        for environment in environments:
            try:
                value = environment.get_reward()
                values.append(float(value) if value is not None else None)
            except Exception:  # noqa: BLE001 - counted as a reward error
                values.append(math.nan)
        return values


class Session:
    """One rollout: for each row (completion) its environment instance, freshly reset, and its tools; the
    conversation so far (for rewards and completions.jsonl); and the counts the logs show."""

    def __init__(self, toolbox: Toolbox, columns: list[dict], fmt: ToolFormat,
                 parser: Callable[[str], list[ToolCall]] = parse_tool_calls):
        self.toolbox, self.fmt, self.parser = toolbox, fmt, parser
        n = len(columns)
        self.environments = toolbox.pool[:n] if toolbox.environment is not None else []
        self.observations = [_call_reset(env, cols) for env, cols in zip(self.environments, columns)] or [None] * n
        self.tools: list[dict[str, Callable]] = []
        for i in range(n):
            methods = environment_methods(self.environments[i]) if self.environments else []
            self.tools.append({fn.__name__: fn for fn in [*toolbox.functions, *methods]})
        self.messages: list[list[dict]] = [[] for _ in range(n)]
        self.rounds = [0] * n  # tool-calling rounds each episode has had
        self.calls = {name: 0 for name in toolbox.names}
        self.counts = {"tool_calls": 0, "tool_errors": 0, "tool_turns": 0, "tool_tokens": 0, "tool_dropped": 0}

    def prompts(self, problems: list, group_size: int, render: Callable) -> tuple[list[str], int]:
        """(prompts, group_size) to generate this session's rows from: `render(problem)` for each problem, with
        group_size rows each; where reset() returned text, it is appended to each row's problem
        (`problem.with_observation`, TRL's place for it) and, when that makes the rows of a group differ, every
        row gets its own prompt (group_size 1: no shared prefill), the rows of a group still side by side."""
        if all(o is None for o in self.observations):
            return [render(p) for p in problems], group_size
        rows = [render(p.with_observation(o)) for p, o in zip([p for p in problems for _ in range(group_size)],
                                                               self.observations)]
        if all(len(set(rows[b * group_size:(b + 1) * group_size])) == 1 for b in range(len(problems))):
            return rows[::group_size], group_size
        return rows, 1

    def respond(self, turns: dict[int, list[int]], rooms: dict[int, int]) -> dict[int, list[int]]:
        """Given each row's latest model turn (token ids, without the EOS that ended it) and how many more tokens
        its episode may hold (0: it is over, e.g. out of budget), run the tools it called and return, for the rows
        that go on, the tokens of the results (the tool turns and the next assistant turn's opening). A row that
        called no tool, reached --max_tool_calling_iterations, or whose results would leave no room for one more
        model token, ends; results that do not fit are not shown (the tools did run, and are counted). Rows run
        their calls concurrently, each row's calls in order."""
        pending = {}
        for row, ids in turns.items():
            text = self.fmt.decode(ids)
            self.messages[row].append({"role": "assistant", "content": text})
            self.counts["tool_turns"] += 1
            if rooms.get(row, 0) < 2:
                continue
            limit = self.toolbox.max_iterations
            if limit is not None and self.rounds[row] >= limit:
                continue
            calls = self.parser(self.fmt.opening(self.rounds[row]) + text)
            if calls:
                pending[row] = calls
        results: dict[int, list[str]] = {}
        threads = [threading.Thread(target=self._run_row, args=(row, calls, results), daemon=True)
                   for row, calls in pending.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out = {}
        for row, calls in pending.items():
            self.rounds[row] += 1
            suffix = self.fmt.suffix_ids(calls, results[row])
            if len(suffix) + 1 > rooms[row]:
                self.counts["tool_dropped"] += 1
                continue
            self.messages[row] += [{"role": "tool", "name": c.name or "unknown", "content": r}
                                   for c, r in zip(calls, results[row])]
            self.counts["tool_tokens"] += len(suffix)
            out[row] = suffix
        return out

    def _run_row(self, row: int, calls: list[ToolCall], results: dict) -> None:
        texts = []
        for i, call in enumerate(calls):
            if i >= MAX_CALLS_PER_TURN:
                text, error = _error(f"at most {MAX_CALLS_PER_TURN} tool calls per turn")
            elif call.error is not None:
                text, error = _error(call.error)
            elif call.name not in self.tools[row]:
                text, error = _error(f"unknown tool {call.name!r} (tools: {', '.join(self.tools[row]) or 'none'})")
            else:
                text, error = run_tool(self.tools[row][call.name], call.arguments, self.toolbox.timeout)
            with _COUNT_LOCK:
                self.counts["tool_calls"] += 1
                self.counts["tool_errors"] += error is not None
                if call.name in self.calls:
                    self.calls[call.name] += 1
            texts.append(text)
        results[row] = texts

    def metric_sums(self) -> dict[str, float]:
        """Sums over this rollout, with the same names on every rank (one per known tool), for the step's
        all-reduce."""
        return {**{name: float(value) for name, value in self.counts.items()},
                **{f"tool_calls/{name}": float(count) for name, count in self.calls.items()}}


_COUNT_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- the calculator

MAX_EXPRESSION_CHARS = 200
MAX_DIGITS = 100  # every number, operand or intermediate result, stays below 10**MAX_DIGITS
MAX_EXPONENT = 100
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression and returns its value.

    Args:
        expression: The expression, made of numbers, + - * / // % ** and parentheses, e.g. "(12 + 30) * 3 / 2".
    """
    if not isinstance(expression, str):
        raise ValueError("the expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return _format_number(evaluate_arithmetic(tree.body))


def evaluate_arithmetic(node: ast.AST) -> int | float:
    """The value of an arithmetic expression's syntax tree, walked node by node (never eval): numbers, + - * / //
    % **, unary signs. Sizes are bounded before any large computation: no number reaches 10**100, no exponent
    exceeds 100.

    >>> evaluate_arithmetic(ast.parse("(12 + 30) * 3 / 2", mode="eval").body)
    63.0
    >>> evaluate_arithmetic(ast.parse("9 ** 9 ** 9", mode="eval").body)
    Traceback (most recent call last):
    ...
    ValueError: exponent 387420489 is larger than 100
    >>> evaluate_arithmetic(ast.parse("__import__('os')", mode="eval").body)
    Traceback (most recent call last):
    ...
    ValueError: unsupported in arithmetic: Call
    """
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = evaluate_arithmetic(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = evaluate_arithmetic(node.left), evaluate_arithmetic(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) >= MAX_DIGITS:
                raise ValueError(f"the result would have more than {MAX_DIGITS} digits")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        try:
            value = _OPERATORS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as e:
            raise ValueError(str(e)) from None
        if isinstance(value, complex):
            raise ValueError("the result is not a real number")
        return _bounded(value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ValueError("^ is not a power here: write ** (e.g. 2 ** 3)")
    raise ValueError(f"unsupported in arithmetic: {type(node).__name__}")


def _bounded(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    if abs(value) >= 10 ** MAX_DIGITS:
        raise ValueError(f"a number has more than {MAX_DIGITS} digits")
    return value


def _format_number(value: int | float) -> str:
    """Integers as written; a float that is a whole number without its '.0'; other floats to 12 significant digits.

    >>> _format_number(63.0), _format_number(1 / 3), _format_number(-7)
    ('63', '0.333333333333', '-7')
    """
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)
