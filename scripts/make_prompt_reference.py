"""Generates tests/fixtures/prompt/expected.json, the reference the Rust `prompt` tests compare against.

Everything is rendered by transformers' own `render_jinja_template` (its sandboxed Jinja2 environment with
trim_blocks, lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now` and the
`{% generation %}` extension), so the expected strings are what `apply_chat_template` produces.

Content formats are computed by `vllm_content_format` below: an independent re-statement of vLLM's "auto"
detection (vllm/entrypoints/chat_utils.py, `_detect_content_format`), which walks the Jinja2 AST.

Usage (needs transformers and jinja2; run from the repository root):
    python scripts/make_prompt_reference.py
"""

import json
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import jinja2.nodes as nodes
from transformers.utils import chat_template_utils as hf

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "prompt"


# ---------------------------------------------------------------- loading, as transformers does


def token_text(value):
    """A tokenizer_config.json special token: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_model_dir(directory: Path):
    """(template, bos, eos): chat_template.jinja, else chat_template.json, else tokenizer_config.json."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    if (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    elif (directory / "chat_template.json").exists():
        template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    else:
        template = config["chat_template"]
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}["default"]
    return template, token_text(config.get("bos_token")), token_text(config.get("eos_token"))


# ---------------------------------------------------------------- vLLM's content-format detection


def _is_var(node, name):
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node, name, key):
    if isinstance(node, nodes.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, nodes.Const) and node.arg.value == key
    if isinstance(node, nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _accesses(node, name, key=None):
    """`name` (or `name[key]` / `name.key`), possibly behind filters, tests and slices."""
    if isinstance(node, nodes.Filter):
        return node.node is not None and _accesses(node.node, name, key)
    if isinstance(node, nodes.Test):
        return _accesses(node.node, name, key)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _accesses(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


class _Malformed(Exception):
    """vLLM asserts that matching targets are plain names; a failed assert makes it fall back to 'string'."""


def vllm_content_format(template: str) -> str:
    try:
        root = hf._compile_jinja_template(template).environment.parse(template)
    except Exception:
        return "string"
    try:
        # Names bound, directly or through assignments, to `messages` (breadth first, as vLLM does).
        message_lists = ["messages"]
        queue = deque(["messages"])
        while queue:
            current = queue.popleft()
            for assign in root.find_all(nodes.Assign):
                if _accesses(assign.node, current):
                    if not isinstance(assign.target, nodes.Name):
                        raise _Malformed()
                    message_lists.append(assign.target.name)
                    if assign.target.name != current:
                        queue.append(assign.target.name)
        # Loop variables iterating those lists.
        message_vars = []
        for loop in root.find_all(nodes.For):
            if any(_accesses(loop.iter, name) for name in message_lists):
                if not isinstance(loop.target, nodes.Name):
                    raise _Malformed()
                message_vars.append(loop.target.name)
        # Any loop over `<message var>['content']` means the template wants a list of parts.
        for loop in root.find_all(nodes.For):
            if any(_accesses(loop.iter, name, "content") for name in message_vars):
                if not isinstance(loop.target, nodes.Name):
                    raise _Malformed()
                return "openai"
        return "string"
    except _Malformed:
        return "string"


# ---------------------------------------------------------------- rendering


def hf_content(parts, content_format, placeholder):
    """The message content a server hands the template: HF processor dicts, or parts joined by newlines."""
    if content_format == "openai":
        return [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"} for p in parts]
    return "\n".join(p["text"] if p["type"] == "text" else placeholder for p in parts)


def render(template, messages, add_generation_prompt, bos, eos, kwargs):
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    try:
        out, _ = hf.render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **special,
            **kwargs,
        )
        return {"output": out[0]}
    except jinja2.exceptions.TemplateError as err:
        if type(err) is jinja2.exceptions.TemplateError:  # raise_exception raises the base class
            return {"raised": str(err)}
        return {"render_error": f"{type(err).__name__}: {err}"}
    except Exception as err:
        return {"render_error": f"{type(err).__name__}: {err}"}


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}

# Sorted at every level, so the test stays valid whether or not serde_json preserves key order.
WEATHER_TOOLS = [
    {
        "function": {
            "description": "Get the current weather in a given location",
            "name": "get_current_weather",
            "parameters": {
                "properties": {
                    "location": {"description": "The city and state, e.g. San Francisco, CA", "type": "string"},
                    "unit": {"enum": ["celsius", "fahrenheit"], "type": "string"},
                },
                "required": ["location"],
                "type": "object",
            },
        },
        "type": "function",
    }
]

COMMON_CASES = [
    ("single_user", [("user", [text("Hello, how are you?")])], True, {}),
    (
        "system_multi_turn",
        [
            ("system", [text("You are a helpful assistant.")]),
            ("user", [text("Hi!")]),
            ("assistant", [text("Hello! How can I help?")]),
            ("user", [text("Tell me a joke.")]),
        ],
        True,
        {},
    ),
    ("multi_turn_no_generation_prompt", [("user", [text("Hi")]), ("assistant", [text("Hello there.")])], False, {}),
    ("image_then_text", [("user", [IMAGE, text("What is in this image?")])], True, {}),
    (
        "interleaved_images",
        [
            ("user", [text("Compare"), IMAGE, text("and"), IMAGE, text("please.")]),
            ("assistant", [text("They differ.")]),
            ("user", [text("Why?")]),
        ],
        True,
        {},
    ),
    ("awkward_text", [("user", [text("  Héllo <b>&amp;</b> 'quoted' \"double\" {{ not jinja }} 😀\n\n  ")])], True, {}),
    ("two_text_parts", [("user", [text("Line one"), text("Line two")])], False, {}),
    ("empty_text", [("user", [text("")])], True, {}),
]

MODEL_CASES = {
    "mistral-7b-instruct-v0.3": [
        ("roles_not_alternating", [("user", [text("a")]), ("user", [text("b")])], True, {}),
        ("with_tools", [("user", [text("What's the weather in Oslo?")])], True, {"tools": WEATHER_TOOLS}),
    ],
    "llama-3.1-8b-instruct": [
        ("with_tools", [("user", [text("What's the weather in Oslo?")])], True, {"tools": WEATHER_TOOLS}),
        (
            "builtin_tools",
            [("system", [text("Be brief.")]), ("user", [text("Search.")])],
            True,
            {"builtin_tools": ["brave_search", "code_interpreter", "wolfram_alpha"], "date_string": "01 Jan 2025"},
        ),
    ],
    "llama-3.2-11b-vision-instruct": [
        ("image_with_system", [("system", [text("Be brief.")]), ("user", [IMAGE, text("Describe.")])], True, {}),
        ("with_tools", [("user", [text("What's the weather in Oslo?")])], True, {"tools": WEATHER_TOOLS}),
    ],
    "qwen2.5-7b-instruct": [
        ("with_tools", [("user", [text("What's the weather in Oslo?")])], True, {"tools": WEATHER_TOOLS}),
    ],
    "qwen2-vl-7b-instruct": [
        ("vision_ids", [("user", [IMAGE, text("and"), IMAGE])], True, {"add_vision_id": True}),
    ],
}

# Templates that read today's date get a fixed one, so the expected string does not change.
FIXED_DATE = {"llama-3.2-11b-vision-instruct": {"date_string": "26 Jul 2024"}}


def model_entries():
    entries = []
    for directory in sorted((FIXTURES / "models").iterdir()):
        template, bos, eos = load_model_dir(directory)
        content_format = vllm_content_format(template)
        cases = []
        for name, conversation, gen, kwargs in COMMON_CASES + MODEL_CASES.get(directory.name, []):
            kwargs = {**FIXED_DATE.get(directory.name, {}), **kwargs}
            placeholder = "<image>"
            messages = [{"role": role, "content": hf_content(parts, content_format, placeholder)} for role, parts in conversation]
            case = {
                "name": name,
                "messages": [{"role": role, "content": parts} for role, parts in conversation],
                "add_generation_prompt": gen,
                "image_placeholder": placeholder,
                "kwargs": kwargs,
            }
            case.update(render(template, messages, gen, bos, eos, kwargs))
            cases.append(case)
        entries.append(
            {
                "dir": directory.name,
                "content_format": "parts" if content_format == "openai" else "string",
                "bos_token": bos,
                "eos_token": eos,
                "cases": cases,
            }
        )
    return entries


# ---------------------------------------------------------------- engine features, one small template each

# Keys sorted at every level: serde_json (without its preserve_order feature) sorts object keys, so
# only sorted data reaches the template in the same order. Insertion order proper is exercised with
# dict literals written in the templates below.
DATA = {
    "a": [1, 2.5, "x<y>&'\"", None, True, False],
    "b": 1,
    "ctl": "a\nb\tc\u0001\u007f\\",
    "nested": {"x": [{"k": "v"}], "y": {}, "z": []},
    "u": "héllo ☃ 😀",
}
ITEMS = [{"n": 1, "on": True}, {"n": 2, "on": False}, {"n": 3, "on": True}]

FEATURES = [
    ("tojson_default", "{{ data|tojson }}", {"data": DATA}),
    ("tojson_indent", "{{ data|tojson(indent=2) }}", {"data": DATA}),
    ("tojson_indent_zero", "{{ data|tojson(indent=0) }}", {"data": DATA}),
    ("tojson_indent_string", "{{ data|tojson(indent='\\t') }}", {"data": DATA}),
    ("tojson_separators", "{{ data|tojson(separators=(',', ':')) }}", {"data": DATA}),
    ("tojson_indent_separators", "{{ data|tojson(indent=1, separators=(', ', ' = ')) }}", {"data": DATA}),
    (
        "insertion_order",
        "{% set d = {'zeta': 1, 'alpha': {'y': 2, 'b': [3]}} %}{{ d|tojson }} {{ d|tojson(sort_keys=true) }} {{ d }} "
        "{% for k, v in d.items() %}{{ k }};{% endfor %}{{ d|list }}",
        {},
    ),
    ("tojson_ensure_ascii", "{{ data|tojson(ensure_ascii=true) }}", {"data": DATA}),
    ("tojson_positional_is_ensure_ascii", "{{ 'é'|tojson(4) }}", {}),
    ("tojson_empty", "{{ {}|tojson(indent=2) }} {{ []|tojson(indent=2) }} {{ ''|tojson }}", {}),
    ("tojson_scalars", "{{ none|tojson }} {{ true|tojson }} {{ 3|tojson }} {{ 'x'|tojson }} {{ (1, 2)|tojson }}", {}),
    (
        "floats",
        "{{ [1.0, 0.1, 1e16, 1e15, 1.5e-5, 0.0001, 123456789.125, -0.0, 100.0, 2/3, 1e300 * 10]|tojson }} "
        "{{ 1e16 }} {{ 0.00001 }} {{ 2/3 }} {{ 1e22 }} {{ [0.5, 1e-7] }} {{ 4 / 2 }}",
        {},
    ),
    ("tojson_undefined", "{{ nothing|tojson }}", {}),
    ("python_repr", "{{ [1, 'a', \"it's\", 'say \"hi\"', none, true, {'k': [1.5]}] }} {{ none }} {{ true }} {{ {'a': 'b'} }}", {}),
    ("python_repr_escapes", "{{ ['a\\nb', 'tab\\t', '\\\\', 'é', '\\x01', '\\x7f'] }}", {}),
    ("string_filter", "{{ none|string }} {{ [1, 'x']|string }} {{ 1.0|string }} {{ false|string }}", {}),
    ("generation_plain", "{% for x in items %}[{% generation %}{{ x.n }}{% endgeneration %}]{% endfor %}", {"items": ITEMS}),
    ("generation_trim", "A\n  {%- generation -%}\n  {{ 'g' }}  \n  {%- endgeneration -%}\n  B", {}),
    ("generation_blocks", "A\n  {% generation %}\n  g\n  {% endgeneration %}\nB\n", {}),
    ("generation_mixed", "A {%- generation %} g {% endgeneration -%} B", {}),
    ("generation_scope", "{% set a = 1 %}{% generation %}{% set a = 2 %}{{ a }}{% endgeneration %}{{ a }}", {}),
    ("generation_loop_var", "{% for x in [5, 6] %}{% generation %}{{ loop.index }}{{ x }}{% endgeneration %}{% endfor %}", {}),
    ("generation_in_raw_and_string", "{% raw %}{% generation %}{{ x }}{% endraw %}{{ '{% generation %}' }}", {}),
    (
        "loop_controls",
        "{% for x in range(10) %}{% if x is odd %}{% continue %}{% endif %}{% if x > 6 %}{% break %}{% endif %}{{ x }}{% endfor %}",
        {},
    ),
    ("namespace", "{% set ns = namespace(n=0, s='') %}{% for x in [1, 2, 3] %}{% set ns.n = ns.n + x %}{% set ns.s = ns.s ~ x %}{% endfor %}{{ ns.n }} {{ ns.s }}", {}),
    (
        "string_methods",
        "{{ '  ab c  '.strip() }}|{{ 'a,b,,c'.split(',') }}|{{ 'Hello'.startswith('He') }}|{{ 'hello world'.title() }}|"
        "{{ 'x'.upper() }}|{{ 'AbC'.lower() }}|{{ 'a-b'.replace('-', '+') }}|{{ 'abc'.endswith('c') }}|{{ ' x '.lstrip() }}|"
        "{{ ' x '.rstrip() }}|{{ 'a b  c'.split() }}|{{ 'hELLO'.capitalize() }}|{{ 'xxhixx'.strip('x') }}",
        {},
    ),
    (
        "filters",
        "{{ items|selectattr('on')|map(attribute='n')|join(',') }}|{{ items|rejectattr('on')|list|length }}|{{ items|first }}|"
        "{{ (items|last).n }}|{{ '  t  '|trim }}|{{ 'abc'|length }}|{{ [3, 1, 2]|sort|list }}|{{ ['a', 'b']|join }}|"
        "{{ 'x'|upper }}|{{ none|default('d') }}|{{ nothing|default('d') }}|{{ 'xhix'|trim('x') }}|"
        "{{ items|selectattr('n', 'equalto', 2)|list }}|{{ ['b', 'a']|reverse|list }}|{{ 'hello world'|title }}|{{ 'hELLO'|capitalize }}",
        {"items": ITEMS},
    ),
    ("whitespace", "a {# c #} b\n  {% if true %}\n    x\n  {% endif %}\n{#- c2 -#}\n  y\n    {{ 'v' }}\n  {%+ if true %}z{% endif +%}\nw\n", {}),
    ("comment_trim_blocks", "{# note #}\nA\n  {# indented note #}\nB", {}),
    ("trailing_newline_once", "x\n", {}),
    ("trailing_newline_twice", "x\n\n", {}),
    ("raise_exception", "{{ raise_exception('boom ' ~ 1) }}", {}),
    ("raise_in_macro", "{% macro f() %}{{ raise_exception('from macro') }}{% endmacro %}{{ f() }}", {}),
    ("globals_defined", "{{ strftime_now is defined }} {{ raise_exception is defined }} {{ namespace is defined }}", {}),
    ("dict_global", "{{ dict(a=1, b='x') }}", {}),
    ("standard_variables", "{{ tools is none }} {{ documents is none }} {{ messages|length }} {{ add_generation_prompt }} [{{ bos_token }}] {{ bos_token is defined }}", {}),
    (
        "items_and_dictsort",
        "{% set d = {'z': 1, 'a': 2} %}{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|"
        "{% for k, v in d|dictsort %}{{ k }};{% endfor %}|{{ d|items|list }}",
        {},
    ),
    ("slicing", "{{ 'hello'[1:3] }} {{ [1, 2, 3, 4][::-1] }} {{ [1, 2, 3][-1] }} {{ 'abc'[::-1] }}", {}),
    ("tests_and_in", "{{ 'a' in 'cat' }} {{ 'k' in {'k': 1} }} {{ 'x' is string }} {{ {} is mapping }} {{ [1] is iterable }} {{ 'x' is iterable }} {{ 3 is number }} {{ none is none }} {{ 1 is string }}", {}),
    ("arithmetic", "{{ 7 // 2 }} {{ 7 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }} {{ 'ab' * 2 }} {{ 1 + 2.5 }} {{ -7 // 2 }}", {}),
    ("loop_variables", "{% for x in ['a', 'b', 'c'] %}{{ loop.index0 }}{{ loop.revindex }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{% if loop.previtem %}{{ loop.previtem }}{% endif %},{% endfor %}", {}),
    ("set_block_and_macro", "{% set x %}inner {{ 1 }}{% endset %}[{{ x }}]{% macro f(a, b='d') %}{{ a }}-{{ b }}{% endmacro %}{{ f(1) }} {{ f(2, b=3) }}", {}),
    ("conditional_expression", "{{ 'y' if true else 'n' }}[{{ 'z' if false }}]", {}),
    ("unicode", "{{ 'ünï😀'|upper }} {{ 'ünï'|length }}", {}),
    ("undefined_attribute", "{{ nothing.attr }}", {}),
]

DETECTION = [
    ("loop_over_content_item", "{% for m in messages %}{% for c in m['content'] %}{{ c }}{% endfor %}{% endfor %}"),
    ("loop_over_content_attr", "{% for m in messages %}{% for c in m.content %}{{ c }}{% endfor %}{% endfor %}"),
    ("double_quoted_key", '{%- for message in messages -%}{%- for c in message["content"] -%}{%- endfor -%}{%- endfor -%}'),
    ("content_printed_only", "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    ("through_sliced_assignment", "{% set loop_messages = messages[1:] %}{% for m in loop_messages %}{% for c in m.content %}{% endfor %}{% endfor %}"),
    ("through_two_assignments", "{% set a = messages %}{% set b = a|list %}{% for m in b %}{% for c in m.content %}{% endfor %}{% endfor %}"),
    ("filtered_lists", "{% for m in messages|reverse %}{% for c in m['content']|selectattr('type', 'equalto', 'image') %}{% endfor %}{% endfor %}"),
    ("sliced_content", "{% for m in messages[::-1] %}{% for c in m['content'][1:] %}{% endfor %}{% endfor %}"),
    ("parenthesized", "{% for m in (messages) %}{% for c in (m.content) %}{% endfor %}{% endfor %}"),
    ("loop_with_condition", "{% for m in messages %}{% for c in m.content if c.type == 'text' %}{% endfor %}{% endfor %}"),
    ("test_node", "{% for m in messages %}{% for c in m.content is iterable %}{% endfor %}{% endfor %}"),
    ("method_call_is_not_access", "{% for m in messages %}{% for c in m.get('content') %}{% endfor %}{% endfor %}"),
    ("or_expression_is_not_access", "{% for m in messages %}{% for c in m['content'] or [] %}{% endfor %}{% endfor %}"),
    ("indexed_messages_is_not_a_list", "{% set first = messages[0] %}{% for c in first.content %}{% endfor %}"),
    ("macro_parameter_not_tracked", "{% macro r(message) %}{% for c in message.content %}{% endfor %}{% endmacro %}{% for m in messages %}{{ r(m) }}{% endfor %}"),
    ("macro_parameter_same_name", "{% macro r(m) %}{% for c in m.content %}{% endfor %}{% endmacro %}{% for m in messages %}{{ r(m) }}{% endfor %}"),
    ("namespace_target_falls_back", "{% set ns = namespace() %}{% set ns.msgs = messages %}{% for m in messages %}{% for c in m.content %}{% endfor %}{% endfor %}"),
    ("tuple_loop_target_falls_back", "{% for m in messages %}{% for c in m.content %}{% endfor %}{% endfor %}{% for a, b in messages %}{% endfor %}"),
    ("tuple_content_target_falls_back", "{% for m in messages %}{% for i, c in m.content %}{% endfor %}{% for c in m.content %}{% endfor %}{% endfor %}"),
    ("inside_string_or_comment", "{{ '{% for c in m.content %}' }}{# {% for c in m.content %} #}{% for m in messages %}{% raw %}{% for c in m.content %}{% endraw %}{% endfor %}"),
    ("other_key", "{% for m in messages %}{% for c in m['contents'] %}{% endfor %}{% endfor %}"),
    ("loop_over_messages_tuple", "{% for m in messages, messages %}{% for c in m.content %}{% endfor %}{% endfor %}"),
    ("string_concat_key", "{% for m in messages %}{% for c in m['con' 'tent'] %}{% endfor %}{% endfor %}"),
    ("set_block_ignored", "{% set x %}{{ messages }}{% endset %}{% for m in x %}{% for c in m.content %}{% endfor %}{% endfor %}"),
    ("dict_literal_braces", "{{ {'a': {'b': 1}} }}{% for m in messages %}{% for c in m.content %}{% endfor %}{% endfor %}"),
]

STRFTIME_TIMES = [0, 951782400, 1721952000, 1721993045, 4102444799, 1704067200 + 13 * 3600 + 5 * 60 + 9]
STRFTIME_FORMATS = [
    "%d %b %Y",
    "%Y-%m-%d %H:%M:%S",
    "%a %A %b %B %j %I %p %y %%",
    "%-d %-m %-H %-I %-M %-S %-j %e",
    "%c | %x | %X | %D | %F | %T | %R",
    "%u %w %C %h %n %t|%Z|%z|",
]


def main():
    features = []
    for name, template, kwargs in FEATURES:
        features.append({"name": name, "template": template, "kwargs": kwargs, **render(template, [], False, None, None, kwargs)})
    detection = [{"name": n, "template": t, "content_format": "parts" if vllm_content_format(t) == "openai" else "string"} for n, t in DETECTION]
    strftime = []
    for ts in STRFTIME_TIMES:
        moment = datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)  # strftime_now uses a naive datetime
        for fmt in STRFTIME_FORMATS:
            strftime.append({"unix_seconds": ts, "format": fmt, "output": moment.strftime(fmt)})
    reference = {
        "generated_by": "scripts/make_prompt_reference.py",
        "transformers_version": __import__("transformers").__version__,
        "jinja2_version": jinja2.__version__,
        "models": model_entries(),
        "features": features,
        "detection": detection,
        "strftime": strftime,
    }
    out = FIXTURES / "expected.json"
    out.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
