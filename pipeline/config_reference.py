"""The config reference, made from the code: every section's keys, their defaults, and the comment each key has
where its `Config` dataclass declares it. docs/config-reference.md is this module's output, and a test keeps
it so (`python -m pipeline.config_reference > docs/config-reference.md` after changing a Config), so the
reference can never list a key the code does not have, or a default it no longer uses."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap

from pipeline import config as config_mod

HEADER = """# Config reference

Every key of every section, its default and what it does, generated from the code's `Config` dataclasses
(`python -m pipeline.config_reference > docs/config-reference.md`; `tests/test_config_reference.py` fails when
this file is out of date). Give only what differs from the defaults; unknown keys are errors. How config files
are layered on a run, recipes and labelled sections (`[align@text]`): [config.md](config.md).
"""


def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class source: the lines of comment just above it and the one at its end."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.split("\n")
    out: dict[str, str] = {}
    prev = None  # (name, whether its last line ends in a comment)
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            prev = None
            continue
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        if above and prev and prev[1] and i == prev[2] - 1:  # lines that go on with the field above's comment
            out[prev[0]] = " ".join([out[prev[0]]] + above)
            above = []
        tail = lines[node.end_lineno - 1]
        end = tail.split("  # ", 1)[1].strip() if "  # " in tail else ""
        out[node.target.id] = " ".join(x for x in above + [end] if x)
        prev = (node.target.id, bool(end), node.end_lineno)
    return out


def _value(v) -> str:
    """The default as it is written in a TOML file, on one line; none (TOML has no null: the key is left out)."""
    if v is None:
        return "(unset)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string escapes as JSON does
    return repr(v)


def reference() -> str:
    parts = [HEADER]
    for name, values in config_mod.resolve({}).items():
        cls = config_mod.section_class(name)
        notes = field_comments(cls) if cls is not None else {}
        parts.append(f"\n## [{name}]\n\n| key | default | what it does |\n|---|---|---|")
        for key, v in values.items():
            what = notes.get(key, "").replace("|", "\\|")
            parts.append(f"| `{key}` | `{_value(v)}` | {what} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
