"""The README's table of configuration defaults, generated from the schema (the one place each
default is written) and the config group files (what each preset changes).

    .venv/bin/python scripts/defaults_table.py            # print the table
    .venv/bin/python scripts/defaults_table.py --write    # replace it in README.md

tests/test_config_defaults.py checks that the README holds exactly this table.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- defaults:begin (scripts/defaults_table.py) -->", "<!-- defaults:end -->"


def _flat(prefix: str, cls) -> list[tuple[str, object]]:
    rows = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") and f.name != "_target_":
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            rows += _flat(key, f.default_factory)
        elif f.default_factory is not dataclasses.MISSING:
            rows.append((key, f.default_factory()))
        else:
            rows.append((key, f.default))
    return rows


def _text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else '""'


def table() -> str:
    from orchestrator.app_config import AppConfig

    conf = ROOT / "conf"
    presets: dict[str, list[str]] = {}
    for path in sorted(conf.glob("*/*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        if path.parent.name == "sweep":
            continue
        for key, value in values.items():
            flat = [(f"{key}.{k}", v) for k, v in value.items()] if isinstance(value, dict) and key != "args" else \
                [(key, value)]
            for k, v in flat:
                presets.setdefault(f"{path.parent.name}.{k}", []).append(f"{path.stem}: {_text(v)}")
    lines = ["| key | default | presets that set it |", "|---|---|---|"]
    for key, default in _flat("", AppConfig):
        if key.startswith("sweep.") or key == "export_prefix" or key in ("name",):
            continue
        by = "each group option its own" if key.endswith(".name") else ", ".join(presets.get(key, [])) or "-"
        lines.append(f"| `{key}` | {_text(default)} | {by} |")
    return "\n".join(lines)


def main() -> None:
    text = table()
    if "--write" not in sys.argv:
        print(text)
        return
    readme = ROOT / "README.md"
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n" + text + "\n" + body[end:])


if __name__ == "__main__":
    main()
