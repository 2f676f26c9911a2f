"""MkDocs hook: the configuration and CLI reference pages, generated at build time from the code.

`reference/configuration.md` is written from the pydantic settings models (`Settings` and its
sections; every field's type, default and `description=`), `reference/cli.md` from the argparse
parser of `flows.cli`. Both exist only in the build (`File.generated`), so they cannot drift from
the code: a field or a command added there is on the site at the next build.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import sys
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal

CONFIGURATION_PAGE = "reference/configuration.md"
CLI_PAGE = "reference/cli.md"


def on_config(config):
    # The hook imports the project's own modules (tasks/, flows/): the repo root (where mkdocs.yml
    # lies) must be importable whether or not the project is installed in the environment.
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for src_uri, render in ((CONFIGURATION_PAGE, configuration_markdown), (CLI_PAGE, cli_markdown)):
        if files.get_file_from_path(src_uri) is not None:
            files.remove(files.get_file_from_path(src_uri))
        files.append(File.generated(config, src_uri, content=render()))
    return files


# --- configuration ------------------------------------------------------------------------------


def _settings_model() -> type:
    from tasks.config.settings import Settings

    return Settings


def configuration_markdown() -> str:
    """The configuration reference: one table per settings section (key, type, default, description)."""
    settings = _settings_model()
    lines = [
        "# Configuration reference",
        "",
        "Every knob of requant is a key of `params.yaml`, one section per stage; this page is generated",
        "from the settings models (`tasks/config/settings.py`) when the site is built. Keys that are not",
        "listed here are refused when the file is read, with one line that names the key. Relative paths",
        "are relative to the params file. `requant recipes` lists each recipe's own config fields (the",
        "`config` of a candidate).",
        "",
    ]
    top_level = [name for name in settings.model_fields]
    lines += ["Sections: " + ", ".join(f"[`{name}`](#{_anchor(name)})" for name in top_level) + ".", ""]
    for name, field in settings.model_fields.items():
        model = _model_in(field.annotation)
        if model is None:  # a plain top-level key: none today, but render it rather than drop it
            lines += _table("", {name: field}, heading=f"## `{name}`", doc="", anchor=_anchor(name))
            continue
        lines += _section(name, model, level=2)
    return "\n".join(lines) + "\n"


def _section(path: str, model: type, level: int) -> list[str]:
    """A section's table, then one sub-section per nested model, depth first."""
    heading = "#" * level + f" `{path}`"
    doc = inspect.cleandoc(model.__doc__ or "")
    lines = _table(path, model.model_fields, heading=heading, doc=doc, anchor=_anchor(path))
    for name, field in model.model_fields.items():
        nested = _model_in(field.annotation)
        if nested is not None:
            lines += _section(_child_path(path, name, field.annotation), nested, level=min(level + 1, 4))
    return lines


def _table(path: str, fields: dict[str, Any], heading: str, doc: str, anchor: str) -> list[str]:
    lines = [f"{heading} {{#{anchor}}}", ""]
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in fields.items():
        key = f"{path}.{name}" if path else name
        nested = _model_in(field.annotation)
        description = field.description or ""
        aliases = _other_aliases(name, field)
        if aliases:
            description += f" Also accepted as: {', '.join(f'`{a}`' for a in aliases)}."
        if nested is not None:
            child = _child_path(path, name, field.annotation)
            description = (description + " " if description else "") + f"See [`{child}`](#{_anchor(child)})."
        kind = _type_name(field.annotation) + _bounds(field)
        lines.append(f"| `{key}` | {_cell(kind)} | {_cell(_default(field))} | {_cell(description)} |")
    return lines + [""]


def _child_path(path: str, name: str, annotation: Any) -> str:
    suffix = "[]" if typing.get_origin(annotation) is list else ""
    return f"{path}.{name}{suffix}" if path else f"{name}{suffix}"


def _anchor(path: str) -> str:
    return path.replace("[]", "").replace(".", "-").replace("_", "-")


def _model_in(annotation: Any) -> type | None:
    """The settings model a field holds (directly, optionally, or as the items of a list), else None."""
    import types

    from pydantic import BaseModel

    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `Section | None`: an optional section
        models = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = models[0] if len(models) == 1 else annotation
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_name(annotation: Any) -> str:
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if annotation is Any:
        return "any"
    if inspect.isclass(annotation):
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, PurePath):
            return "path"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation)


def _bounds(field: Any) -> str:
    """The field's declared limits (ge=1, lt=0.5, min_length=1), as a reader checks a value against them."""
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}
    limits = []
    for constraint in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(constraint, attr, None)
            if value is not None:
                limits.append(f"{symbol} {value}")
    return f", {', '.join(limits)}" if limits else ""


def _default(field: Any) -> str:
    from pydantic import BaseModel

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.is_required():
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{_yaml_value(value)}`"


def _yaml_value(value: Any) -> str:
    """A default as it would be written in params.yaml (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _yaml_value(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    return str(value)


def _other_aliases(name: str, field: Any) -> list[str]:
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if not choices:
        return []
    return [c for c in choices if isinstance(c, str) and c != name]


def _cell(text: str) -> str:
    # A table cell is one line; a bare | would end the cell early.
    text = " ".join(text.split())
    return _escape_pipes(text)


def _escape_pipes(text: str) -> str:
    # Python-Markdown's tables leave pipes inside code spans alone; only the others are escaped.
    out, in_code = [], False
    for ch in text:
        if ch == "`":
            in_code = not in_code
        out.append("\\|" if ch == "|" and not in_code else ch)
    return "".join(out)


# --- command line -------------------------------------------------------------------------------


def cli_markdown() -> str:
    """The CLI reference: every `requant` subcommand with its help and options."""
    import flows.cli

    parser = flows.cli._parser()
    subcommands = _subcommands(parser)
    lines = [
        "# CLI reference",
        "",
        "The `requant` command (`flows/cli.py`); this page is generated from its argument parser when",
        "the site is built. `requant COMMAND --help` prints the same.",
        "",
    ]
    lines += [para for para in _module_notes(flows.cli.__doc__ or "")]
    lines += ["## Global options {#global-options}", ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    lines += _options_table([a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)])
    lines += ["| command | what it does |", "|---|---|"]
    for name, (help_text, _) in subcommands.items():
        lines.append(f"| [`requant {name}`](#{name}) | {_cell(help_text)} |")
    lines.append("")
    for name, (help_text, sub) in subcommands.items():
        lines += [f"## `requant {name}` {{#{name}}}", "", help_text, ""]
        lines += ["```text", sub.format_usage().strip(), "```", ""]
        lines += _options_table(sub._actions)
    return "\n".join(lines) + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    found: dict[str, tuple[str, argparse.ArgumentParser]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found[name] = (helps.get(name, sub.description or ""), sub)
    return found


def _module_notes(doc: str) -> list[str]:
    """The module docstring's prose after its summary (exit codes), without the command list."""
    paragraphs = [p for p in inspect.cleandoc(doc).split("\n\n")[1:] if p.strip()]
    notes = [" ".join(p.split()) for p in paragraphs if not p.startswith(" ")]
    return [line for note in notes for line in (note, "")]


def _options_table(actions: list[argparse.Action]) -> list[str]:
    rows = []
    for action in actions:
        if isinstance(action, argparse._HelpAction):
            continue
        takes_value = action.nargs != 0 and not action.choices
        metavar = f" {action.metavar or action.dest.upper()}" if takes_value and action.option_strings else ""
        name = ", ".join(f"`{s}{metavar}`" for s in action.option_strings) or f"`{action.dest}`"
        if action.choices:
            name += ": " + " or ".join(f"`{c}`" for c in action.choices)
        if action.required:
            default = "required"
        elif action.nargs == 0:
            default = "off"
        elif action.default is None:
            default = "-"
        else:
            default = f"`{action.default}`"
        rows.append(f"| {name} | {default} | {_cell(action.help or '')} |")
    if not rows:
        return ["No options.", ""]
    return ["| option | default | description |", "|---|---|---|", *rows, ""]
