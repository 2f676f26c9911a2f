"""The documentation: the MkDocs site builds cleanly, its generated reference pages cover the code,
and the README is a front page whose links work.

The site is built once (`mkdocs build --strict`, a few seconds) and read as a user reads it: the
HTML pages, not the hook that wrote them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.cli import _parser
from tasks.config.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    # Material prints a banner about MkDocs 2.0 on every build; it is noise in a test log.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "--site-dir", str(site_dir)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def _settings_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key a user can write in params.yaml, dotted; `[]` marks the items of a list of sections."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        suffix = ""
        if typing.get_origin(annotation) is list:
            (annotation,) = typing.get_args(annotation)
            suffix = "[]"
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # an optional section
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = members[0] if len(members) == 1 else annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if prefix:  # a nested section is itself a key of its parent section
                keys.append(key)
            keys += _settings_keys(annotation, key + suffix)
        else:
            keys.append(key)
    return keys


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_docs_build_strict_succeeds(site):
    assert (site / "index.html").is_file()
    assert (site / "reference" / "configuration" / "index.html").is_file()
    assert (site / "reference" / "cli" / "index.html").is_file()


def test_docs_configuration_page_lists_every_settings_field(site):
    html = (site / "reference" / "configuration" / "index.html").read_text()
    keys = _settings_keys(Settings)
    assert "data.train_csv" in keys and "quantize.candidates[].recipe" in keys  # the walk reaches lists too
    missing = [key for key in keys if f"<code>{key}</code>" not in html]
    assert not missing, f"params.yaml keys missing from the configuration reference: {missing}"


def test_docs_cli_page_lists_every_subcommand_and_its_options(site):
    html = (site / "reference" / "cli" / "index.html").read_text()
    subcommands = _subcommands(_parser())
    assert "run" in subcommands
    for name, sub in subcommands.items():
        heading = re.search(rf'<h2 id="{re.escape(name)}">.*?<code>requant {re.escape(name)}</code>', html)
        assert heading, f"`requant {name}` has no section on the CLI page"
        section = html[heading.end():].split("<h2", 1)[0]
        for action in sub._actions:
            for option in action.option_strings:
                if option in ("-h", "--help"):
                    continue
                assert re.search(rf"<code>{re.escape(option)}[ <]", section), f"requant {name} {option} is not documented"


def test_readme_is_a_front_page_under_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_relative_links_point_to_existing_files():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "the README links to no documentation page"
    broken = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not broken, f"README links to files that do not exist: {broken}"
