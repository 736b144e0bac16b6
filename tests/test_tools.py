"""Agents: tools and environments (grpo_ds.tools) and multi-turn rollouts (generation.episodes).

The calculator against hand values and hostile input; loading tools and environments in TRL's documented form, and
bad flags refused in one line before any model loads; parsing calls; a tool that raises, hangs, returns a
non-text value, or is called badly or under an unknown name, answered with an error and counted; the tool-result
framing of a template with and without tool support; a worked example that calls a tool, framed as a rollout frames
a call, and a prefix that opens the call; episodes on a tiny random model with scripted tool calls:
masks, budgets, engines, log-probs against whole-row recomputation, and tool tokens that never receive gradient."""

import builtins
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_tools  # noqa: E402
from helpers import ASCII_CHARS, build_tiny_model, build_tokenizer  # noqa: E402

from grpo_ds.config import LOSS_TYPES, Config  # noqa: E402
from grpo_ds.data import Problem, prompt_messages, render_chat  # noqa: E402
from grpo_ds.generation import Sampling, StaticDecoder, generate  # noqa: E402
from grpo_ds.logprobs import completion_logprobs  # noqa: E402
from grpo_ds.loss import BatchTotals, GRPOLoss  # noqa: E402
from grpo_ds.models import load_tokenizer  # noqa: E402
from grpo_ds.rewards import WeightedReward, score_completions  # noqa: E402
from grpo_ds.tools import (Toolbox, ToolCall, ToolFormat, calculator, parse_tool_calls, run_tool,  # noqa: E402
                           tool_instructions)

# ----------------------------------------------------------------------------- the calculator


@pytest.mark.parametrize("expression, value", [
    ("(12 + 30) * 3 / 2", "63"),  # 42 * 3 = 126, / 2 = 63.0, shown as a whole number
    ("7 // 2", "3"),
    ("7 % 3", "1"),
    ("-3 + 5 % 3", "-1"),  # 5 % 3 = 2, -3 + 2
    ("2 ** 10", "1024"),
    ("2 ** -2", "0.25"),
    ("1 / 3", "0.333333333333"),  # 12 significant digits
    ("+4 - -4", "8"),
    (" 17 * 17 ", "289"),
    ("9 ** 100", str(9 ** 100)),  # 96 digits: within the bound
    ("0.1 + 0.2", "0.3"),  # 0.30000000000000004 to 12 digits
])
def test_calculator_values(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('echo hi')", "unsupported in arithmetic: Call"),
    ("x + 1", "unsupported in arithmetic: Name"),
    ("(1).real", "unsupported in arithmetic: Attribute"),
    ("'a' * 3", "unsupported in arithmetic: Constant"),
    ("True + 1", "unsupported in arithmetic: Constant"),  # bools are not numbers here
    ("1 < 2", "unsupported in arithmetic: Compare"),
    ("[1, 2]", "unsupported in arithmetic: List"),
    ("(lambda: 1)()", "unsupported in arithmetic: Call"),
    ("2 ^ 3", "^ is not a power here: write ** (e.g. 2 ** 3)"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "0.0 cannot be raised to a negative power"),
    ("(-8) ** 0.5", "the result is not a real number"),
    ("1 +", "not an arithmetic expression: '1 +'"),
    ("import os", "not an arithmetic expression: 'import os'"),
])
def test_calculator_refuses_what_is_not_arithmetic(expression, message):
    with pytest.raises(ValueError) as info:
        calculator(expression)
    assert str(info.value) == message


@pytest.mark.parametrize("expression, message", [
    ("9 ** 9 ** 9", "exponent 387420489 is larger than 100"),  # right-associative: 9 ** 387420489
    ("99 ** 100", "the result would have more than 100 digits"),  # 100 x log10(99) = 199.6 digits
    ("10 ** 99 * 10 ** 99", "a number has more than 100 digits"),  # each operand fits, the product does not
    ("1" * 101, "a number has more than 100 digits"),
    ("1e400", "the result is not a finite number"),
    ("1" + " + 1" * 60, "the expression is longer than 200 characters"),
])
def test_calculator_bounds_sizes_before_computing(expression, message):
    started = time.perf_counter()
    with pytest.raises(ValueError) as info:
        calculator(expression)
    assert str(info.value) == message
    assert time.perf_counter() - started < 0.5  # refused before any large computation


def test_calculator_never_evals(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec was called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert calculator("6 * 7") == "42"


def test_calculator_is_a_tool_with_a_schema():
    box = Toolbox.from_flags("grpo_ds.tools:calculator")
    (schema,) = box.schemas
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]
    assert schema["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    assert schema["function"]["description"] == "Evaluates an arithmetic expression and returns its value."


# ----------------------------------------------------------------------------- loading, and bad flags


def test_trls_documented_tool_form_works_as_written():
    """TRL's documentation's tool (type hints, Google docstring with Args and Returns, returning an int) loads as
    written, its schema is transformers' own, and a call returns the int as text (TRL's str())."""
    box = Toolbox.from_flags("agent_tools:multiply")
    assert box.schemas == [{"type": "function", "function": {
        "name": "multiply", "description": "Multiplies two integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "description": "The first integer."},
            "b": {"type": "integer", "description": "The second integer."}}, "required": ["a", "b"]},
        "return": {"type": "integer", "description": "The product of the two integers."}}}]
    assert run_tool(agent_tools.multiply, {"a": 6, "b": 7}, 1.0) == ("42", None)


def test_an_environment_in_trls_form_loads():
    box = Toolbox.from_flags("grpo_ds.tools:calculator", "agent_tools:Counter")
    assert box.names == ["calculator", "increment"] and box.has_reward
    assert box.environment_name == "Counter"


@pytest.mark.parametrize("tools, environment, message", [
    ("nosuchmodule:fn", "", "--tools 'nosuchmodule:fn': cannot import module 'nosuchmodule' (ModuleNotFoundError: "
                            "No module named 'nosuchmodule')"),
    ("agent_tools:nothing", "", "--tools 'agent_tools:nothing': module 'agent_tools' has no attribute 'nothing'"),
    ("calculator", "", "--tools 'calculator': expected module:function (e.g. grpo_ds.tools:calculator)"),
    ("agent_tools:no_hints", "", "--tools 'agent_tools:no_hints': no_hints cannot be a tool: Argument a is missing a "
                                 "type hint in function no_hints (a tool needs type hints on every argument and a "
                                 "Google docstring with an Args section)"),
    ("agent_tools:no_docstring", "", "--tools 'agent_tools:no_docstring': no_docstring cannot be a tool: Cannot "
                                     "generate JSON schema for no_docstring because it has no docstring! (a tool "
                                     "needs type hints on every argument and a Google docstring with an Args "
                                     "section)"),
    ("agent_tools:multiply,agent_tools:multiply", "", "--tools 'agent_tools:multiply,agent_tools:multiply': two "
                                                      "tools share a name (multiply, multiply)"),
    ("", "agent_tools:NoReset", "--environment 'agent_tools:NoReset': NoReset has no reset() method (called before "
                                "every rollout; it may return text for the prompt)"),
    ("", "agent_tools", "--environment 'agent_tools': expected module:Class (e.g. mypackage.envs:Game)"),
])
def test_bad_tool_flags_are_one_line(tools, environment, message):
    with pytest.raises(ValueError) as info:
        Toolbox.from_flags(tools, environment)
    assert str(info.value) == message


def test_bad_agent_input_is_refused_before_any_model_loads(refuse):
    refuse("--tools 'nosuchmodule:fn': cannot import module 'nosuchmodule' (ModuleNotFoundError: No module named "
           "'nosuchmodule')", tools="nosuchmodule:fn")
    refuse("--environment 'agent_tools:NoReset': NoReset has no reset() method (called before every rollout; it may "
           "return text for the prompt)", environment="agent_tools:NoReset")
    refuse("--reward none: no reward term; 'none' needs an --environment whose class defines get_reward()",
           reward="none", tools="grpo_ds.tools:calculator")
    refuse("--tool_timeout 5.0: has no effect without --tools or --environment", tool_timeout=5.0)
    refuse("--tools grpo_ds.tools:calculator: the vLLM engine does not run tool rollouts yet; use --rollout_engine "
           "hf or compiled", tools="grpo_ds.tools:calculator", rollout_engine="vllm")
    refuse("--max_episode_tokens 4: must be >= --max_new_tokens 8 (it caps the model's tokens and the tool results "
           "together)", tools="grpo_ds.tools:calculator", max_new_tokens=8, max_episode_tokens=4)


# ----------------------------------------------------------------------------- parsing calls


def test_parse_tool_calls():
    text = ('I will use two tools.<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
            '<tool_call>{"name": "shout", "arguments": "{\\"text\\": \\"hi\\"}"}</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("multiply", {"a": 6, "b": 7}), ToolCall("shout", {"text": "hi"})]
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>') == [ToolCall("f", {})]  # no arguments: none
    assert parse_tool_calls('<tool_call>["f"]</tool_call>')[0].error == \
        'a tool call is a JSON object with a "name" and "arguments"'
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": 3}</tool_call>')[0].error == \
        '"arguments" must be a JSON object'
    assert parse_tool_calls('<tool_call>{"name": "f"').pop().error == \
        "a <tool_call> was opened and never closed with </tool_call>"
    assert parse_tool_calls("The answer is 42.") == []


# ----------------------------------------------------------------------------- executing calls safely


def test_run_tool_answers_every_failure_with_an_error():
    assert run_tool(agent_tools.explode, {"text": "x"}, 1.0) == ("Error: RuntimeError: the tool broke",
                                                                 "RuntimeError: the tool broke")
    assert run_tool(agent_tools.objecty, {"text": "x"}, 1.0)[0] == "Error: returned dict, not text"
    assert run_tool(lambda: None, {}, 1.0)[0] == "Error: returned NoneType, not text"
    assert run_tool(lambda: b"x", {}, 1.0)[0] == "Error: returned bytes, not text"
    assert run_tool(agent_tools.multiply, {"a": 1}, 1.0)[0] == "Error: bad arguments (missing a required argument: 'b')"
    assert run_tool(agent_tools.multiply, {"a": 1, "b": 2, "c": 3}, 1.0)[0] == \
        "Error: bad arguments (got an unexpected keyword argument 'c')"
    assert run_tool(agent_tools.multiply, {"a": "x", "b": "y"}, 1.0)[0] == \
        "Error: TypeError: can't multiply sequence by non-int of type 'str'"
    assert run_tool(lambda: sys.exit(3), {}, 1.0)[0] == "Error: SystemExit: 3"  # a tool never ends the run
    assert run_tool(lambda: 2.5, {}, 1.0) == ("2.5", None) and run_tool(lambda: True, {}, 1.0) == ("True", None)
    long = run_tool(lambda: "x" * 5000, {}, 1.0)[0]
    assert long == "x" * 2000 + " [cut at 2000 characters]"


def test_run_tool_abandons_a_slow_call_after_its_timeout():
    started = time.perf_counter()
    assert run_tool(agent_tools.sleepy, {"seconds": 30}, 0.2) == ("Error: timed out after 0.2 s",
                                                                  "timed out after 0.2 s")
    assert time.perf_counter() - started < 2
    assert run_tool(agent_tools.sleepy, {"seconds": 0.01}, 5.0) == ("awake", None)


def test_run_tool_awaits_an_async_tool():
    async def fetch(city: str) -> str:
        return f"sunny in {city}"

    assert run_tool(fetch, {"city": "Oslo"}, 1.0) == ("sunny in Oslo", None)


# ----------------------------------------------------------------------------- rendering and framing

ASCII = build_tokenizer(ASCII_CHARS)
ASCII.padding_side = "left"
# A template that renders tools as Qwen2.5's does: the schemas in the system turn, tool results inside a user turn
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'tool' %}{% if loop.first or messages[loop.index0 - 1]"
    "['role'] != 'tool' %}<|im_start|>user{% endif %}{{ '\\n<tool_response>\\n' + m['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif m.get('tool_calls') %}<|im_start|>assistant\n{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ c['function'] | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def native_tokenizer():
    tokenizer = build_tokenizer(ASCII_CHARS)
    tokenizer.chat_template = NATIVE_TEMPLATE
    return tokenizer


def test_text_format_frames_results_as_a_tool_turn():
    """The tiny ChatML template has no tool support: results come back as a `tool` turn wrapped in
    <tool_response>, then the next assistant turn opens (and the response prefix follows it)."""
    fmt = ToolFormat(ASCII, response_prefix="<think>")
    assert not fmt.native and fmt.role == "tool"
    ids = fmt.suffix_ids([ToolCall("multiply", {"a": 6, "b": 7})], ["42"])
    assert ASCII.decode(ids) == ("\n<|im_start|>tool\n<tool_response>\n42\n</tool_response><|im_end|>\n"
                                 "<|im_start|>assistant\n<think>")
    two = ASCII.decode(fmt.suffix_ids([ToolCall("f", {}), ToolCall("g", {})], ["1", "Error: x"]))
    assert two == ("\n<|im_start|>tool\n<tool_response>\n1\n</tool_response><|im_end|>\n<|im_start|>tool\n"
                   "<tool_response>\nError: x\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>")


def test_a_template_that_renders_tools_frames_results_its_own_way():
    tokenizer = native_tokenizer()
    fmt = ToolFormat(tokenizer)
    assert fmt.native
    text = tokenizer.decode(fmt.suffix_ids([ToolCall("f", {}), ToolCall("g", {})], ["1", "2"]))
    assert text == ("\n<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n"
                    "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    schemas = Toolbox.from_flags("agent_tools:multiply,agent_tools:shout").schemas
    prompt = render_chat(tokenizer, [{"role": "user", "content": "hi"}], tools=schemas)
    assert prompt == "<|im_start|>system\nTOOLS: multiply shout<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                     "<|im_start|>assistant\n"


def test_a_template_without_tool_support_gets_the_text_format_in_its_system_turn():
    schemas = Toolbox.from_flags("agent_tools:multiply").schemas
    prompt = render_chat(ASCII, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6*7?"}],
                         tools=schemas)
    expected_system = "Be brief.\n\n" + tool_instructions(schemas)
    assert prompt == (f"<|im_start|>system\n{expected_system}<|im_end|>\n<|im_start|>user\n6*7?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert json.dumps(schemas[0]) in prompt and "<tool_call>" in prompt
    # without a system turn, one is added
    assert render_chat(ASCII, [{"role": "user", "content": "q"}], tools=schemas).startswith(
        f"<|im_start|>system\n{tool_instructions(schemas)}<|im_end|>")


def test_a_template_that_refuses_a_tool_role_gets_results_in_a_user_turn():
    tokenizer = build_tokenizer(ASCII_CHARS)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
                               "{{ raise_exception('roles must be user or assistant') }}{% endif %}<|im_start|>"
                               "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = ToolFormat(tokenizer)
    assert fmt.role == "user"
    assert tokenizer.decode(fmt.suffix_ids([ToolCall("f", {})], ["1"])) == \
        "\n<|im_start|>user\n<tool_response>\n1\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- a worked example that calls a tool

EXAMPLE = dict(example_question="6*7?", example_tool_call='Let me.<tool_call>{"name": "multiply", "arguments": '
               '{"a": 6, "b": 7}}</tool_call>', example_answer="<answer>42</answer>", tools="agent_tools:multiply")


def test_a_worked_example_that_calls_a_tool_is_framed_as_rollouts_frame_a_call():
    """--example_tool_call: the example's call runs now (the 42 is the tool's, not written in the config) and the
    example reads as an episode would: the call's turn, its EOS, then exactly the framing a rollout appends after
    a call (ToolFormat.suffix_ids), then the final answer."""
    box = Toolbox.from_flags("agent_tools:multiply")
    example = Config(**EXAMPLE).example(box)
    assert example[2] == {"role": "tool", "name": "multiply", "content": "42"}
    prompt = render_chat(ASCII, prompt_messages("2*3?", "Be brief.", example), "<think>", box.schemas)
    call = '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
    rollout_framing = ASCII.decode(ToolFormat(ASCII, "<think>").suffix_ids([ToolCall("multiply", {"a": 6, "b": 7})],
                                                                          ["42"]))
    assert rollout_framing == ("\n<|im_start|>tool\n<tool_response>\n42\n</tool_response><|im_end|>\n"
                               "<|im_start|>assistant\n<think>")
    assert prompt == (f"<|im_start|>system\nBe brief.\n\n{tool_instructions(box.schemas)}<|im_end|>\n"
                      f"<|im_start|>user\n6*7?<|im_end|>\n<|im_start|>assistant\nLet me.{call}<|im_end|>"
                      "\n<|im_start|>tool\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
                      "<answer>42</answer><|im_end|>\n<|im_start|>user\n2*3?<|im_end|>\n<|im_start|>assistant\n"
                      "<think>")
    # a template that renders tools gets the call in its tool_calls field and the result its own way
    native = native_tokenizer()
    assert render_chat(native, prompt_messages("2*3?", None, example), "", box.schemas) == (
        "<|im_start|>system\nTOOLS: multiply<|im_end|>\n<|im_start|>user\n6*7?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        "<answer>42</answer><|im_end|>\n<|im_start|>user\n2*3?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("change, message", [
    (dict(example_tool_call="No call here."), "--example_tool_call 'No call here.': no <tool_call>{\"name\": ..., "
                                              "\"arguments\": {...}}</tool_call> in it"),
    (dict(example_tool_call='<tool_call>{"name": "divide", "arguments": {}}</tool_call>'),
     "--example_tool_call: calls 'divide', which is not a --tools function (multiply; an environment's methods "
     "need its state)"),
    (dict(example_tool_call='<tool_call>{"name": "multiply", "arguments": {"a": 6}}</tool_call>'),
     "--example_tool_call: multiply({\"a\": 6}) answered \"Error: bad arguments (missing a required argument: "
     "'b')\""),
    (dict(example_tool_call="<tool_call>{oops}</tool_call>"),
     "--example_tool_call: the tool call is not valid JSON (Expecting property name enclosed in double quotes)"),
])
def test_a_bad_worked_example_call_is_one_line(change, message):
    with pytest.raises(ValueError) as info:
        Config(**{**EXAMPLE, **change}).example(Toolbox.from_flags("agent_tools:multiply"))
    assert str(info.value) == message


def test_bad_worked_example_flags_are_refused_before_any_model_loads(refuse):
    call = EXAMPLE["example_tool_call"]
    refuse(f"--example_tool_call {call}: is the worked example's first turn; give --example_question and "
           f"--example_answer", example_tool_call=call)
    refuse(f"--example_tool_call {call}: calls tools, and there are none: give --tools",
           **{k: v for k, v in EXAMPLE.items() if k != "tools"})
    refuse("--example_tool_call: calls 'multiply', which is not a --tools function (calculator; an environment's "
           "methods need its state)", **{**EXAMPLE, "tools": "grpo_ds.tools:calculator"})
    refuse("--turn_prefix <think>: has no effect without --tools or --environment", turn_prefix="<think>")


def test_several_worked_examples_from_a_yaml_list_are_shown_in_order(tmp_path):
    """A YAML list in each example field gives one worked example per entry, each call run now (6 * 7 = 42 and
    2 * 5 = 10, the tool's results), in the list's order; config.json keeps them as the flags take them (JSON
    lists), and evaluation rebuilds the same turns from it."""
    from grpo_ds.config import dumps, read_config_file
    from grpo_ds.inference import prompt_format

    calls = [f'<tool_call>{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>'
             for a, b in ((6, 7), (2, 5))]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tools: agent_tools:multiply\nexample_question:\n  - '6*7?'\n  - '2*5?'\n"
                      f"example_tool_call:\n  - '{calls[0]}'\n  - '{calls[1]}'\n"
                      "example_answer:\n  - '<answer>42</answer>'\n  - '<answer>10</answer>'\n")
    values = read_config_file(str(recipe))
    assert values["example_question"] == '["6*7?", "2*5?"]'
    example = Config(**values).example(Toolbox.from_flags("agent_tools:multiply"))
    assert [(m["role"], m["content"]) for m in example] == [
        ("user", "6*7?"), ("assistant", ""), ("tool", "42"), ("assistant", "<answer>42</answer>"),
        ("user", "2*5?"), ("assistant", ""), ("tool", "10"), ("assistant", "<answer>10</answer>")]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(dumps(Config(**values)))
    assert prompt_format(str(run_dir)).example == example
    # without tools: the questions and answers alone, as alternating turns
    plain = Config(example_question='["1+1?", "2+2?"]', example_answer='["2", "4"]').example()
    assert [(m["role"], m["content"]) for m in plain] == [("user", "1+1?"), ("assistant", "2"), ("user", "2+2?"),
                                                          ("assistant", "4")]
    assert Config(example_question="[not json", example_answer="x").example() == ("[not json", "x")


def test_worked_examples_of_unequal_counts_are_refused_before_any_model_loads(refuse):
    refuse('--example_answer ["2"]: holds 1 example(s) and --example_question 2: give one per example, in the same '
           'order', example_question='["1+1?", "2+2?"]', example_answer='["2"]')


def test_a_prefix_that_opens_the_call_is_read_with_the_turn_and_later_turns_open_with_turn_prefix():
    """--response_prefix writes the first turn's opening (here the call's), so the model's tokens alone hold no
    <tool_call>: the call is read with its opening. The turns after the results open with --turn_prefix."""
    fmt = ToolFormat(ASCII, response_prefix='<tool_call>{"name": "multiply", "arguments": {"a": ',
                     turn_prefix="<think>")
    box = Toolbox.from_flags("agent_tools:multiply")
    session = box.session([{}], fmt)
    first = session.respond({0: encode('6, "b": 7}}</tool_call>')}, {0: 500})
    assert session.messages[0][-1] == {"role": "tool", "name": "multiply", "content": "42"}
    assert ASCII.decode(first[0]).endswith("<|im_start|>assistant\n<think>")
    # the second turn opens with <think>, not with the call's opening: its text is read as written
    assert session.respond({0: encode('6, "b": 7}}</tool_call>')}, {0: 500}) == {}
    assert session.counts["tool_calls"] == 1
    assert ToolFormat(ASCII, response_prefix="<think>").turn_prefix == "<think>"  # by default, the same prefix


def test_environment_text_joins_the_prompt():
    assert Problem("Guess.", "7").with_observation(" Below 10.").question == "Guess. Below 10."
    chat = Problem("q", "1", messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}))
    assert chat.with_observation("!").messages[0]["content"] == "q!"  # the last user turn


# ----------------------------------------------------------------------------- one rollout's session


def encode(text: str) -> list[int]:
    return ASCII(text, add_special_tokens=False)["input_ids"]


def call_text(name: str, arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_session_survives_failing_slow_and_malformed_tools():
    """Each row calls one misbehaving tool; every row gets an answer (an error where the call failed), the errors
    are counted, and the slow tool holds the others for no longer than its timeout."""
    box = Toolbox.from_flags("agent_tools:explode,agent_tools:sleepy,agent_tools:objecty,agent_tools:multiply",
                             timeout=0.5)
    turns = [call_text("explode", {"text": "x"}), call_text("sleepy", {"seconds": 30}),
             call_text("objecty", {"text": "x"}), call_text("multiply", {"a": 1}), call_text("nosuch", {}),
             "<tool_call>{not json}</tool_call>", call_text("multiply", {"a": 6, "b": 7}), "No tool needed."]
    session = box.session([{}] * len(turns), ToolFormat(ASCII))
    started = time.perf_counter()
    results = session.respond({row: encode(text) for row, text in enumerate(turns)}, {row: 500 for row in
                                                                                      range(len(turns))})
    assert time.perf_counter() - started < 3  # 30 s of sleep abandoned after 0.5 s
    assert sorted(results) == list(range(7))  # every row that called a tool goes on; the last one is done
    answers = [session.messages[row][-1]["content"] for row in range(7)]
    assert answers == ["Error: RuntimeError: the tool broke", "Error: timed out after 0.5 s",
                       "Error: returned dict, not text", "Error: bad arguments (missing a required argument: 'b')",
                       "Error: unknown tool 'nosuch' (tools: explode, sleepy, objecty, multiply)",
                       "Error: the tool call is not valid JSON (Expecting property name enclosed in double quotes)",
                       "42"]
    assert ASCII.decode(results[6]) == ("\n<|im_start|>tool\n<tool_response>\n42\n</tool_response><|im_end|>\n"
                                        "<|im_start|>assistant\n")
    sums = session.metric_sums()
    assert (sums["tool_calls"], sums["tool_errors"], sums["tool_turns"]) == (7, 6, 8)
    assert (sums["tool_calls/explode"], sums["tool_calls/sleepy"], sums["tool_calls/multiply"]) == (1, 1, 2)
    assert sums["tool_tokens"] == sum(len(ids) for ids in results.values())


def test_session_limits_rounds_and_room():
    box = Toolbox.from_flags("agent_tools:multiply", max_iterations=1)
    session = box.session([{}] * 2, ToolFormat(ASCII))
    turn = encode(call_text("multiply", {"a": 2, "b": 3}))
    first = session.respond({0: turn, 1: turn}, {0: 500, 1: 10})  # row 1: the result (60 tokens) does not fit
    assert list(first) == [0] and session.counts["tool_dropped"] == 1 and session.counts["tool_calls"] == 2
    assert session.messages[1] == [{"role": "assistant", "content": call_text("multiply", {"a": 2, "b": 3})}]
    assert session.respond({0: turn}, {0: 500}) == {}  # --max_tool_calling_iterations 1: no second round
    assert session.counts["tool_calls"] == 2


def test_environments_one_per_row_reset_every_rollout():
    box = Toolbox.from_flags("", "agent_tools:Counter")
    session = box.session([{}] * 3, ToolFormat(ASCII))
    assert len({id(e) for e in session.environments}) == 3 and session.observations == [None] * 3
    turn = encode(call_text("increment", {"step": 2}))
    session.respond({0: turn, 2: turn}, {0: 500, 2: 500})
    session.respond({0: turn}, {0: 500})
    assert [e.counter for e in session.environments] == [4, 0, 2]  # each row its own instance
    assert box.reward(session.environments) == [4.0, 0.0, 2.0]
    again = box.session([{}] * 3, ToolFormat(ASCII))  # the next rollout: the same instances, reset
    assert [e.counter for e in again.environments] == [0, 0, 0]


def test_environment_reward_is_a_term_and_its_failures_are_counted():
    box = Toolbox.from_flags("", "agent_tools:BadReward")
    session = box.session([{}] * 2, ToolFormat(ASCII))
    term = WeightedReward(box.environment_name, box.reward, 1.0, batched=True)
    rewards, stats = score_completions(["a", "b"], ["1", "1"], [term], extras={"environments":
                                                                                session.environments})
    assert rewards == [0.0, 0.0] and stats["reward_errors"] == 2
    counter = Toolbox.from_flags("", "agent_tools:Counter")
    envs = counter.session([{}] * 2, ToolFormat(ASCII)).environments
    envs[1].increment(5)
    rewards, _ = score_completions(["a", "b"], ["1", "1"],
                                   [WeightedReward("Counter", counter.reward, 1.0, batched=True)],
                                   extras={"environments": envs})
    assert rewards == [0.0, 5.0]


def test_trl_rewards_see_the_whole_episode_as_messages():
    seen = {}

    def reward(completions, **kwargs):
        seen["completions"] = completions
        return [float(len(c)) for c in completions]

    problem = Problem("q", "1", messages=({"role": "user", "content": "q"},))
    episode = [{"role": "assistant", "content": "call"}, {"role": "tool", "name": "f", "content": "1"},
               {"role": "assistant", "content": "done"}]
    rewards, _ = score_completions(["whole text"], [problem], [WeightedReward("r", reward, 1.0, True)],
                                   messages=[episode])
    assert seen["completions"] == [episode] and rewards == [3.0]


# ----------------------------------------------------------------------------- episodes on a tiny model

EOS_BIAS = 2.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("ascii"), chars=ASCII_CHARS)
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = EOS_BIAS  # turns of a few tokens
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    return model, tokenizer


def prompts_of(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in ("6*7?", "what is 12*3?")]


def always(name: str, arguments: dict):
    """A scripted 'model' decision: every turn calls this tool (the random model cannot write a call itself)."""
    return lambda text: [ToolCall(name, arguments)]


def run_episodes(tiny, parser, seed=0, max_new_tokens=10, max_iterations=2, cap=400, engine=None, tools="",
                 environment="", group_size=3, timeout=5.0, share_prefill=True):
    model, tokenizer = tiny
    box = Toolbox.from_flags(tools or "agent_tools:multiply", environment, timeout, max_iterations)
    session = box.session([{}] * (2 * group_size), ToolFormat(tokenizer), parser=parser)
    torch.manual_seed(seed)
    rollout = generate(model, tokenizer, prompts_of(tokenizer), Sampling(max_new_tokens), group_size=group_size,
                       tools=session, max_episode_tokens=cap, engine=engine, share_prefill=share_prefill)
    return rollout, session


def runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of ones in a 0/1 row."""
    out, start = [], None
    for i, v in enumerate(mask_row.tolist() + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def test_episode_masks_budgets_and_results(tiny):
    model, tokenizer = tiny
    rollout, session = run_episodes(tiny, always("multiply", {"a": 6, "b": 7}))
    completion, tools, episode = rollout.completion_mask_NC, rollout.tool_mask_NC, rollout.episode_mask_NC
    assert not (completion.bool() & tools.bool()).any()  # a token is the model's or a tool's, never both
    assert torch.equal(completion + tools, episode)  # together: the whole episode, contiguous from the start
    for row in episode:
        assert row.tolist() == sorted(row.tolist(), reverse=True)
    suffix = ToolFormat(tokenizer).suffix_ids([ToolCall("multiply", {"a": 6, "b": 7})], ["42"])
    num_prompt = rollout.sequences_NT.shape[1] - completion.shape[1]
    called = 0
    for n in range(len(completion)):
        assert int(completion[n].sum()) <= 10  # max_new_tokens counts the model's tokens only
        assert int(episode[n].sum()) <= 400
        tool_runs = runs(tools[n])
        assert len(tool_runs) <= 2  # --max_tool_calling_iterations 2
        for start, end in tool_runs:  # every tool span is exactly the framed result "42"
            assert rollout.sequences_NT[n, num_prompt + start:num_prompt + end].tolist() == suffix
            assert rollout.sequences_NT[n, num_prompt + start - 1] == tokenizer.eos_token_id  # after a turn's EOS
        model_runs = runs(completion[n])
        assert len(model_runs) == len(tool_runs) + 1  # turns and results alternate, a model turn last
        roles = [m["role"] for m in rollout.messages_N[n]]
        assert roles == ["assistant", "tool"] * len(tool_runs) + ["assistant"]
        called += len(tool_runs)
    assert called > 0 and int(tools.sum()) > 10  # the episodes are longer than the model's budget
    assert (rollout.sampler_logprobs_NC[tools.bool()] == 0).all()
    assert session.counts["tool_calls"] == called and session.counts["tool_errors"] == 0
    assert session.counts["tool_tokens"] == int(tools.sum())


def test_rows_that_call_no_tool_finish_while_others_go_on(tiny):
    def parser(text):  # the first turn of rows whose text has an even length calls the tool
        return [ToolCall("multiply", {"a": 2, "b": 2})] if len(text) % 2 == 0 else []

    rollout, session = run_episodes(tiny, parser, max_iterations=1, max_new_tokens=40)
    called = rollout.tool_mask_NC.sum(dim=1) > 0
    assert called.any() and not called.all()
    first_turns = [runs(row)[0] for row in rollout.completion_mask_NC]
    assert all(end - start < 40 for start, end in first_turns)  # every first turn ended with its EOS
    for n in range(len(called)):
        first_turn = rollout.messages_N[n][0]["content"]
        assert bool(called[n]) == (len(first_turn) % 2 == 0)
        assert len(rollout.messages_N[n]) == (3 if called[n] else 1)


def test_the_episode_cap_drops_results_that_do_not_fit(tiny):
    rollout, session = run_episodes(tiny, always("multiply", {"a": 6, "b": 7}), cap=30)
    assert int(rollout.tool_mask_NC.sum()) == 0  # each framed result is ~60 tokens: none fits in 30
    assert session.counts["tool_dropped"] > 0 and session.counts["tool_calls"] == session.counts["tool_dropped"]
    assert (rollout.episode_mask_NC.sum(dim=1) <= 30).all()


def test_a_failing_tool_inside_episodes_is_survived_and_counted(tiny):
    rollout, session = run_episodes(tiny, always("explode", {"text": "x"}), tools="agent_tools:explode")
    assert session.counts["tool_errors"] == session.counts["tool_calls"] > 0
    assert all(m["content"] == "Error: RuntimeError: the tool broke"
               for episode in rollout.messages_N for m in episode if m["role"] == "tool")


def test_the_compiled_engine_draws_the_episodes_generate_draws(tiny):
    model, _ = tiny
    hf, _ = run_episodes(tiny, always("multiply", {"a": 6, "b": 7}), seed=3)
    static, _ = run_episodes(tiny, always("multiply", {"a": 6, "b": 7}), seed=3, engine=StaticDecoder(model))
    assert int(hf.tool_mask_NC.sum()) > 0
    for name in ("sequences_NT", "attention_mask_NT", "completion_mask_NC", "tool_mask_NC", "truncated_N"):
        assert torch.equal(getattr(static, name), getattr(hf, name)), name
    torch.testing.assert_close(static.sampler_logprobs_NC, hf.sampler_logprobs_NC, atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ["hf", "compiled"])
def test_later_turns_prefill_each_prompt_once_and_draw_what_whole_rows_draw(tiny, engine):
    """A later turn prefills each group's prompt on its own (once per prompt in use) and only the rows' own turns
    and results on top: no forward call runs a prompt together with a row's history, as prefilling every row whole
    (--share_prefill false) does for every row that goes on. Both draw the same tokens."""
    model, tokenizer = tiny
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts_of(tokenizer)]
    most = {}  # share -> the most rows any one forward call ran a whole prompt and more in

    def count(module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows = [ids[r][mask[r, -ids.shape[1]:].bool()].tolist() for r in range(ids.shape[0])]
        held = sum(any(len(row) > len(p) and row[:len(p)] == p for p in prompts) for row in rows)
        most[share] = max(most.get(share, 0), held)

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    rollouts = {}
    try:
        for share in (True, False):
            decoder = StaticDecoder(model) if engine == "compiled" else None
            rollouts[share], _ = run_episodes(tiny, always("multiply", {"a": 6, "b": 7}), seed=5, engine=decoder,
                                              share_prefill=share)
    finally:
        hook.remove()
    shared, whole = rollouts[True], rollouts[False]
    went_on = int((shared.tool_mask_NC.sum(dim=1) > 0).sum())  # rows decoded a later turn
    assert went_on >= 2
    assert most[True] == 0 and most[False] == went_on
    for name in ("sequences_NT", "attention_mask_NT", "completion_mask_NC", "tool_mask_NC", "truncated_N"):
        assert torch.equal(getattr(shared, name), getattr(whole, name)), name
    torch.testing.assert_close(shared.sampler_logprobs_NC, whole.sampler_logprobs_NC, atol=1e-5, rtol=0)


def whole_row_logprobs(model, sequences, attention, num_completion):
    """Every row through the model on its own row of the batch, no packing."""
    pos = (attention.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=pos).logits[:, -num_completion - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, -num_completion:, None]).squeeze(-1)


def test_episode_logprobs_equal_a_whole_row_recomputation(tiny):
    """The sampler's log-probs of every model token (each later turn decoded from its own history) equal the
    trainer's over the finished rows: packed by shared prompt (the trainer's path) and whole rows."""
    model, _ = tiny
    rollout, _ = run_episodes(tiny, always("multiply", {"a": 6, "b": 7}))
    c, m = rollout.completion_mask_NC.shape[1], rollout.completion_mask_NC.bool()
    assert int(rollout.tool_mask_NC.sum()) > 0
    with torch.no_grad():
        packed = completion_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT, c)
        whole = whole_row_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT, c)
    torch.testing.assert_close(packed[m], rollout.sampler_logprobs_NC[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[m], rollout.sampler_logprobs_NC[m], atol=1e-5, rtol=0)
    e = rollout.episode_mask_NC.bool()  # tool tokens too: packing is exact on the whole episode
    torch.testing.assert_close(packed[e], whole[e], atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tool_tokens_never_receive_gradient(tiny, loss_type):
    """Perturb everything the loss reads at tool-result positions (the policy's log-probs, old, reference, sampler
    weights and entropies): the gradient on the weights does not move. The same perturbation with the episode mask
    in place of the completion mask (the tool mask dropped) does move it, so this test would catch that bug."""
    model, _ = tiny
    rollout, _ = run_episodes(tiny, always("multiply", {"a": 6, "b": 7}))
    tool = rollout.tool_mask_NC.float()
    assert tool.sum() > 0
    c = rollout.completion_mask_NC.shape[1]
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.0, 0.7, -0.2])
    loss_fn = GRPOLoss(kl_weight=0.1, loss_type=loss_type, clip_eps_high=1.5 if loss_type == "cispo" else None)

    def gradient(mask, shift):
        model.zero_grad()
        logprobs = completion_logprobs(model, rollout.sequences_NT, rollout.attention_mask_NT, c) + 3.0 * shift
        old = rollout.sampler_logprobs_NC - 0.05 + 2.0 * shift  # off-policy, so the ratio and clipping matter
        ref = rollout.sampler_logprobs_NC + 0.1 - 5.0 * shift
        loss, _ = loss_fn(logprobs, old, ref, advantages, mask, BatchTotals.single(mask, 10),
                          entropies_NC=torch.ones_like(logprobs) + 4.0 * shift,
                          sampling_weights_NC=torch.ones_like(logprobs) + 7.0 * shift)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    model.train()
    try:
        base = gradient(rollout.completion_mask_NC, torch.zeros_like(tool))
        perturbed = gradient(rollout.completion_mask_NC, tool)
        assert base.abs().sum() > 0
        torch.testing.assert_close(perturbed, base, atol=1e-7, rtol=1e-6)
        episode = rollout.episode_mask_NC  # the bug: tool results trained on as if the model had written them
        assert not torch.allclose(gradient(episode, tool), gradient(episode, torch.zeros_like(tool)), atol=1e-6)
    finally:
        model.eval()
        model.zero_grad()


def test_environment_text_in_prompts_row_by_row(tiny):
    """An environment whose reset() text differs per row: each row gets its own prompt (group_size 1 to the
    generator), the rows of a group still side by side."""
    _, tokenizer = tiny
    box = Toolbox.from_flags("", "agent_tools:Greeter")
    problems = [Problem("a?", "1", columns={"question": "a?"}), Problem("b?", "2", columns={"question": "b?"})]
    session = box.session([p.columns for p in problems for _ in range(2)], ToolFormat(tokenizer))
    render = lambda p: f"<{p.question}>"  # noqa: E731
    prompts, group_size = session.prompts(problems, 2, render)
    numbers = [e.number for e in session.environments]
    assert group_size == 1 and prompts == [f"<a? (instance {numbers[0]})>", f"<a? (instance {numbers[1]})>",
                                           f"<b? (instance {numbers[2]})>", f"<b? (instance {numbers[3]})>"]
    counter = Toolbox.from_flags("", "agent_tools:Counter")
    same = counter.session([{}] * 4, ToolFormat(tokenizer))
    assert same.prompts(problems, 2, render) == (["<a?>", "<b?>"], 2)  # no text: shared prompts


def scripted_sessions(monkeypatch, parser):
    """Every session the code under test opens gets `parser` as the model's decisions."""
    real = Toolbox.session
    monkeypatch.setattr(Toolbox, "session", lambda self, columns, fmt, parser_=None: real(self, columns, fmt, parser))


def test_evaluation_runs_the_tool_loop_of_training(tiny, monkeypatch):
    """The held-out evaluation (in training and scripts/eval.py) asks with the tools' schemas and runs the same
    loop: completions are episodes, scored on their whole text, their length the model's tokens."""
    from grpo_ds.eval import evaluate

    model, tokenizer = tiny
    scripted_sessions(monkeypatch, always("multiply", {"a": 6, "b": 7}))
    box = Toolbox.from_flags("agent_tools:multiply", max_iterations=1)
    problems = [Problem("6*7?", "42"), Problem("2+2?", "4"), Problem("1+2?", "3")]
    summary, rows = evaluate(model, tokenizer, problems, max_new_tokens=10, batch_size=2, system_prompt=None,
                             toolbox=box, max_episode_tokens=400)
    with_tools = [r for r in rows if any(m["role"] == "tool" for m in r["episode"])]
    assert with_tools and all("42" in r["completion"] for r in with_tools)  # the result is in the scored text
    assert all(r["num_tokens"] <= 10 for r in rows) and summary["n"] == 3
    # and without tools, the same call evaluates as before: no episode, no tool turn
    _, plain = evaluate(model, tokenizer, problems, max_new_tokens=10, batch_size=2, system_prompt=None)
    assert all("episode" not in r for r in plain)


def test_ask_uses_the_runs_tools(tiny, tmp_path, monkeypatch):
    """A run trained with tools is asked with them: prompt_format reads them from its config.json, and answers are
    episodes."""
    from grpo_ds import inference

    model, tokenizer = tiny
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "config.json").write_text("{}")
    (run_dir / "config.json").write_text(json.dumps({"rollouts_per_step": 4, "group_size": 4, "system_prompt": "none",
                                                     "tools": "agent_tools:multiply", "tool_timeout": 5.0,
                                                     "max_tool_calling_iterations": 1, "max_episode_tokens": 400}))
    fmt = inference.prompt_format(str(run_dir))
    assert fmt.toolbox is not None and fmt.toolbox.names == ["multiply"] and fmt.max_episode_tokens == 400
    assert "<tools>" in fmt.render(tokenizer, "6*7?")
    monkeypatch.setattr(inference, "load", lambda spec, dtype="auto": (model, tokenizer))
    scripted_sessions(monkeypatch, always("multiply", {"a": 6, "b": 7}))
    answers = inference.answer_all(str(run_dir), ["6*7?", "what is 12*3?"], Sampling(10), fmt, batch_size=2)
    assert any("42" in a.text for a in answers) and all(a.num_tokens <= 10 for a in answers)
    assert inference.prompt_format(None).toolbox is None


def test_a_run_with_a_worked_tool_example_is_asked_with_it_and_without_tools_on_request(tiny, tmp_path):
    """eval/ask/serve read the example's call and the turn prefix from the run; --no_tools (tools=False) asks
    without the tools: no schemas, no loop, and the example's question and final answer only."""
    from grpo_ds import inference

    _, tokenizer = tiny
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "config.json").write_text("{}")
    (run_dir / "config.json").write_text(json.dumps({**EXAMPLE, "rollouts_per_step": 4, "group_size": 4, "system_prompt": "none",
                                                     "turn_prefix": "<think>"}))
    fmt = inference.prompt_format(str(run_dir))
    assert fmt.toolbox.names == ["multiply"] and fmt.turn_prefix == "<think>"
    assert "<tool_response>\n42\n</tool_response>" in fmt.render(tokenizer, "2*3?")
    plain = inference.prompt_format(str(run_dir), tools=False)
    assert plain.toolbox is None and plain.example == ("6*7?", "<answer>42</answer>")
    assert plain.render(tokenizer, "2*3?") == ("<|im_start|>user\n6*7?<|im_end|>\n<|im_start|>assistant\n"
                                               "<answer>42</answer><|im_end|>\n<|im_start|>user\n2*3?<|im_end|>\n"
                                               "<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- training runs (2 CPU ranks)

AGENT_FLAGS = ["--rollouts_per_step", "4", "--group_size", "4", "--train_batch_size", "4", "--max_new_tokens", "8",
               "--lr", "1e-2", "--kl_weight", "0.05", "--log_completions_steps", "1", "--system_prompt", "none",
               "--tools", "grpo_ds.tools:calculator", "--environment", "agent_tools:Counter",
               "--max_tool_calling_iterations", "2", "--max_episode_tokens", "300", "--max_length", "2048"]


@pytest.fixture(scope="module")
def agent_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("agent") / "model", chars=ASCII_CHARS)


def metrics_of(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_agents_train_on_two_ranks_under_zero2_and_resume_exactly(tmp_path, agent_model):
    """Episodes with an environment (its reward a term), a calculator and an unknown tool called now and then, on 2
    ranks under ZeRO-2: the ranks stay in sync, the tool metrics and whole episodes are logged, and a run stopped
    after step 2 and resumed gives the uninterrupted run's steps 3 and 4 and weights."""
    from helpers import records, run, zero_config

    flags = ["--ds_config", zero_config(tmp_path, "zero2.json"), "--model", str(agent_model), *AGENT_FLAGS,
             "--reward", "learnable:sevens_dense", "--save_steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run([*flags, "--output_dir", str(straight), "--max_steps", "4"], tmp_path, fault="scripted_tool_calls")
    rows = metrics_of(straight)
    for row in rows:
        assert row["tools/call_frequency"] > 0 and row["tools/calls/increment"] > 0
        assert row["tools/calls/calculator"] == 0 and row["tools/tool_tokens_mean"] > 0
        assert 0 < row["completion_len_mean"] <= 8  # the model's tokens only
        assert row["reward/Counter"] > 0 and row["update_skipped"] == 0
        assert row["tools/turns_mean"] > 1
    assert sum(row["tool_errors"] for row in rows) > 0  # the unknown tool, answered with an error
    per_rank = records(straight)
    for a, b in zip(*per_rank):  # both ranks hold the same weights after every step
        assert a["fingerprint"] == pytest.approx(b["fingerprint"], rel=1e-6)
    assert len({r["fingerprint"] for r in per_rank[0]}) == 4  # and they moved every step
    logged = [json.loads(line) for line in (straight / "completions.jsonl").read_text().splitlines()]
    episodes = [row["episode"] for row in logged]
    assert all(e[0]["role"] == "assistant" and e[-1]["role"] == "assistant" for e in episodes)
    results = [m["content"] for e in episodes for m in e if m["role"] == "tool"]
    assert results and any(r.startswith("Error: unknown tool 'nosuch'") for r in results)
    assert any(r.isdigit() for r in results)  # the counter's value, as text

    run([*flags, "--output_dir", str(split), "--max_steps", "2"], tmp_path, fault="scripted_tool_calls")
    run([*flags, "--output_dir", str(split), "--max_steps", "4", "--resume_from", "latest"], tmp_path,
        fault="scripted_tool_calls")
    resumed = metrics_of(split)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed):
        for key in ("loss", "reward_mean", "kl", "grad_norm", "completion_len_mean", "tools/call_frequency",
                    "tools/tool_tokens_mean", "tool_errors", "reward/Counter"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["step"], key)
    assert records(split)[0][-1]["fingerprint"] == pytest.approx(per_rank[0][-1]["fingerprint"], rel=1e-6)


@pytest.mark.slow
def test_agents_with_lora_zero3_dynamic_sampling_and_the_compiled_engine(tmp_path, agent_model):
    """The environment's reward alone (--reward none), LoRA adapters, ZeRO-3, dynamic sampling (a session per
    round) and the static engine, together on 2 ranks."""
    from helpers import records, run, zero_config

    out = tmp_path / "run"
    run(["--ds_config", zero_config(tmp_path, "zero3.json"), "--model", str(agent_model), *AGENT_FLAGS,
         "--reward", "none", "--lora_r", "4", "--lora_alpha", "8", "--dynamic_sampling", "true",
         "--rollout_engine", "compiled", "--max_steps", "2", "--save_steps", "0", "--output_dir", str(out)],
        tmp_path, fault="scripted_tool_calls")
    rows = metrics_of(out)
    assert len(rows) == 2
    for row in rows:
        assert row["tools/call_frequency"] > 0 and row["reward_mean"] > 0 and "sampling_rounds" in row
    a, b = records(out)
    assert a[-1]["fingerprint"] == pytest.approx(b[-1]["fingerprint"], rel=1e-6)
