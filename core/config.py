"""The rules every config dataclass of the project follows, and the toolkit that applies them.

Every field of a config is declared with param(default, help, domain): the one place where an
option's default, meaning and allowed values (core.domains) are written. The CLI turns each
field into the kebab-case flag of its name (--base-width <-> base_width) whose parser is the
domain, shows that help and default, and a TOML table of --config sets the same fields, checked
against the same domains when the file is read. Configs are frozen and validate themselves in
__post_init__ (validate_fields, then their cross-field rules); the resolved values are saved as
JSON beside every output (config_to_dict).
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, Field, asdict, field, fields
from pathlib import Path

from core.domains import Domain, quote
from core.errors import UserError, first_line


def param(default=MISSING, help: str = "", domain: Domain | None = None, *, factory=None, shown: str | None = None,
          flag: bool = True):
    """A config field with its help text and its domain (core.domains: what it may hold, used by
    the CLI's parser, the TOML loader and validate_fields alike). shown: the default as the CLI
    should print it (when the value alone would mislead, e.g. None meaning "resolved later");
    flag=False: not a flag. A field whose default is None may also be None (unset)."""
    if domain is None:
        raise TypeError(f"param({help!r}) needs a domain")
    metadata = {"help": help, "shown": shown, "domain": domain, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def domain_of(f: Field) -> Domain:
    return f.metadata["domain"]


def field_problem(f: Field, value) -> str | None:
    """What is wrong with value for field f (None: nothing); None is allowed where it is the default."""
    if value is None and f.default is None:
        return None
    problem = domain_of(f).check(value)
    return None if problem is None else f"{f.name} {problem}"


def validate_fields(config, what: str) -> None:
    """Coerce every field of a config dataclass to its canonical form (a TOML list -> a tuple, an
    integer -> a float) and raise one UserError naming every field outside its domain. Called
    first in each config's __post_init__; cross-field rules follow it there."""
    problems = []
    for f in fields(config):
        value = getattr(config, f.name)
        if value is not None:
            value = domain_of(f).coerce(value)
            object.__setattr__(config, f.name, value)
        problem = field_problem(f, value)
        if problem:
            problems.append(problem)
    check(problems, what)


def check(problems: list[str], what: str) -> None:
    """Raise one UserError naming every problem of a configuration."""
    if problems:
        raise UserError(f"invalid {what}: " + "; ".join(problems))


def build_config(cls, values: dict, what: str):
    """cls(**values) with unknown keys named in one line (a TOML table or a typo)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {what} option(s) {unknown}; expected some of {sorted(known)}")
    return cls(**values)


def read_toml_tables(path: Path | None, known: dict[str, type], ignored=()) -> dict[str, dict]:
    """The tables of a --config TOML file, each for the config class `known` maps its name to,
    every value coerced and checked against its field's domain here, before any work starts (a
    bad value is named with its file and table). An unknown table or key is an error (tables in
    `ignored` are another command's, skipped)."""
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; pass a TOML file")
    try:
        tables = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid TOML ({first_line(err)}); fix it") from None
    unknown = sorted(set(tables) - set(known) - set(ignored))
    if unknown:
        raise UserError(f"config file {path} has unknown tables {unknown}; use {', '.join(f'[{t}]' for t in known)}")
    out = {}
    for table, values in tables.items():
        if table not in known:
            continue
        if not isinstance(values, dict):
            raise UserError(f"config file {path}: {table} must be a table [{table}], got {quote(values)}")
        by_name = {f.name: f for f in fields(known[table]) if f.metadata.get("flag", True)}
        bad = sorted(set(values) - set(by_name))
        if bad:
            raise UserError(
                f"config file {path}: unknown [{table}] option(s) {bad}; expected some of {sorted(by_name)}"
            )
        out[table] = {}
        for key, value in values.items():
            value = domain_of(by_name[key]).coerce(value)
            problem = field_problem(by_name[key], value)
            if problem:
                raise UserError(f"config file {path}: [{table}] {problem}")
            out[table][key] = value
    return out


def config_to_dict(config) -> dict:
    """A config as JSON-able data (tuples as lists), as saved beside every output."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {k: plain(v) for k, v in asdict(config).items()}
