"""The docs stay true: their Python examples run, their commands parse, and the
configuration reference lists every key with its default."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from knhk_memory.cli import build_parser
from knhk_memory.config import SCHEMA, OpenKeys, defaults, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"(<!-- not run: (?P<why>[^>]*) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
REQUIRED_DOCS = ("architecture.md", "configuration.md", "engine-guide.md", "performance.md", "troubleshooting.md",
                 "hooks.md", "budgets.md")


def blocks(lang: str) -> list[tuple[str, int, str, str | None]]:
    out = []
    for doc in DOCS:
        for i, m in enumerate(b for b in BLOCK.finditer(doc.read_text()) if b["lang"] == lang):
            out.append((doc.name, i, m["body"], m["why"]))
    return out


def test_the_docs_issue_9_asks_for_exist():
    names = {d.name for d in DOCS}
    for name in REQUIRED_DOCS:
        assert name in names, name


RUNNABLE = [(d, i, body) for d, i, body, why in blocks("python") if why is None]


@pytest.mark.parametrize("doc, index, body", RUNNABLE, ids=[f"{d}-{i}" for d, i, _ in RUNNABLE])
def test_python_examples_run(tmp_path, doc, index, body):
    r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "KNHK_MEMORY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, f"{doc} block {index} failed:\n{r.stderr}"


def test_examples_not_run_say_why_and_the_new_docs_have_none():
    for doc, index, _, why in blocks("python"):
        if why is not None:
            assert len(why.strip()) > 10, f"{doc} block {index}: a not-run block must say why"
            assert doc not in ("engine-guide.md", "architecture.md", "configuration.md", "README.md"), doc


def _commands() -> list[tuple[str, list[str]]]:
    out = []
    for doc, _, body, _ in blocks("sh") + blocks("console"):
        for line in body.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("knhk-memory "):
                argv = shlex.split(line.split("#")[0])[1:]
                shell = [i for i, a in enumerate(argv) if a in (">", ">>", "<", "|", "2>")]  # the shell's part
                out.append((doc, argv[:shell[0]] if shell else argv))
    return out


@pytest.mark.parametrize("doc, argv", _commands(), ids=[f"{d}:{' '.join(a)}" for d, a in _commands()])
def test_knhk_memory_commands_in_the_docs_parse(doc, argv):
    build_parser().parse_args(argv)  # SystemExit(2) on an unknown command or option


def test_configuration_reference_lists_every_key_with_its_default():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for section, fields in SCHEMA.items():
        assert f"## [{section}]" in text, section
        if isinstance(fields, OpenKeys):
            continue
        part = text.split(f"## [{section}]", 1)[1].split("\n## ", 1)[0]
        for key, field in fields.items():
            row = next((ln for ln in part.splitlines() if ln.startswith(f"| `{key}` |")), None)
            assert row is not None, f"[{section}] {key} is not in docs/configuration.md"
            default = row.split("|")[3].strip().strip("`")
            assert tomllib.loads(f"v = {default}")["v"] == field.default, (section, key, default)


def test_the_every_key_example_is_the_defaults(tmp_path):
    text = (ROOT / "docs" / "configuration.md").read_text()
    example = text.split("## A file with every key", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "knhk.toml").write_text(example)
    config = load_config(tmp_path / "knhk.toml")
    values = config.as_dict()
    assert values.pop("budgets") == {"counter_add": 16}
    want = defaults()
    want.pop("budgets")
    assert values == want


def test_readme_commands_are_the_dev_script():
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/dev.sh run" in text and "bash scripts/dev.sh test" in text
    script = (ROOT / "scripts" / "dev.sh").read_text()
    assert 'knhk-memory" demo "$@"' in script

