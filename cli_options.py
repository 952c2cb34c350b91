"""How the CLI's options are made (typer): one option per config field, parsed and checked by the
field's domain (core.domains), the commands' own options declared the same way (Opt), and
--config TOML tables merged under the flags typed. Only cli.py imports this module; with cli.py
it is the one place that knows typer. OPTIONS records every command's options and their domains
(the CLI-wide fuzz test draws bad values from them)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Annotated

import typer
from rich.markup import escape

from core.config import domain_of, read_toml_tables
from core.domains import Domain, Flag, Texts
from core.paths import InputFile

TYPED = ("COMMANDLINE", "ENVIRONMENT")  # parameter sources of values the user gave (typer vendors click)
# Every option of every command: command -> {parameter name: (what the user types, domain)}.
OPTIONS: dict[str, dict[str, tuple[tuple[str, ...], Domain]]] = {}
GROUPS: dict[str, tuple[Group, ...]] = {}  # command -> the config groups its options and --config set
# click's base of usage errors (a bad or unknown flag); typer vendors click, so it is found, not imported.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


@dataclasses.dataclass(frozen=True)
class Group:
    """The fields of one config class a command exposes, and the TOML table that sets them."""

    table: str
    cls: type
    only: tuple[str, ...] | None = None
    shown: str | None = None  # one default note for every field (e.g. "the checkpoint's")

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.metadata.get("flag", True)
                and (self.only is None or f.name in self.only)]


@dataclasses.dataclass(frozen=True)
class Opt:
    """A command's own option (or positional argument) that is no config field, with its domain."""

    domain: Domain
    help: str
    positional: bool = False


def _parser(domain: Domain):
    """A flag's text -> its value, or click's one-line usage error naming the flag and what it allows."""
    def parse(text):
        if not isinstance(text, str):
            return text  # a default, not typed
        try:
            value = domain.parse(text)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        problem = domain.check(value)
        if problem:
            raise typer.BadParameter(problem)
        return value
    return parse


def _parameter(name: str, domain: Domain, help_text: str, default, shown, positional=False, many=False):
    """An inspect.Parameter typer turns into the option (or argument) of a value of `domain`; a
    repeated one (many) parses each value with the domain's item. Only values actually typed are
    used (click's parameter source), so TOML tables can set the rest."""
    flag = name.replace("_", "-")
    help_text = escape(help_text)
    each = getattr(domain, "item", domain) if many else domain
    kind = list[str] if many else str
    if isinstance(domain, Flag):
        info, kind = typer.Option(f"--{flag}/--no-{flag}", help=help_text, show_default=shown), bool
    elif positional:
        info = typer.Argument(help=help_text, parser=_parser(each), metavar=name.upper())
    else:
        info = typer.Option(f"--{flag}", help=help_text, parser=_parser(each), metavar=each.metavar,
                            show_default=shown)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind if positional else kind | None, info])


def _field_option(f: dataclasses.Field, shown: str | None) -> inspect.Parameter:
    """The flag of a config field: a plain default is shown (so --help prints it); a default that
    needs words ("the dataset's") prints those."""
    default = f.default if f.default is not dataclasses.MISSING else None
    note = shown or f.metadata.get("shown")
    show = escape(note) if note else (default is not None)
    return _parameter(f.name, domain_of(f), f.metadata.get("help", ""), default if show is True else None, show,
                      many=isinstance(domain_of(f), Texts))


def _own_parameter(p: inspect.Parameter) -> tuple[inspect.Parameter, Domain]:
    """A command function's own parameter, declared as Annotated[type, Opt(...)], as a typer one."""
    base, *meta = typing.get_args(p.annotation)
    opt = next((m for m in meta if isinstance(m, Opt)), None)
    if opt is None:
        raise TypeError(f"option {p.name} is declared without Opt(domain, help)")
    show = p.default is not None
    param = _parameter(p.name, opt.domain, opt.help, p.default, show, opt.positional, typing.get_origin(base) is list)
    return param, opt.domain


def _flags(param: inspect.Parameter) -> tuple[str, ...]:
    """What a user types for a parameter: its flag(s), or the argument's name in capitals."""
    info = typing.get_args(param.annotation)[1]
    first = getattr(info, "default", None)  # typer takes an Annotated option's first declaration as this
    decls = ((first,) if isinstance(first, str) and first.startswith("-") else ()) + tuple(
        getattr(info, "param_decls", None) or ())
    return tuple(d for decl in decls for d in decl.split("/")) or (param.name.upper(),)


def command(app: typer.Typer, name: str, *groups: Group, ignored_tables: tuple[str, ...] = (), **settings):
    """Register fn as command `name` with its own parameters, --config (when it has groups) and one
    option per field of the groups. fn receives fields={table: the TOML table's values overridden
    by the flags typed} and config (the TOML path, or None); ignored_tables are another command's,
    skipped. A parameter named ctx receives the click context."""
    tables = ", ".join(f"[{g.table}]" for g in groups)
    config_help = (
        f"TOML file with {'the ' + tables + ' table' if len(groups) == 1 else tables + ' tables'}; typed flags win"
    )
    config_domain = InputFile("TOML file")

    def wrap(fn):
        signature = inspect.signature(fn, eval_str=True).parameters
        wants_ctx = "ctx" in signature
        own, domains = [], {}
        for p in signature.values():
            if p.name not in ("fields", "config", "ctx"):
                param, domains[p.name] = _own_parameter(p)
                own.append(param)
        generated = {}  # field name -> (table, field, parameter)
        for g in groups:
            for f in g.fields():
                generated[f.name] = (g.table, f, _field_option(f, g.shown))
                domains[f.name] = domain_of(f)
        tail = [_parameter("config", config_domain, config_help, None, False)] if groups else []
        domains["config"] = config_domain
        tail += [param for _, _, param in generated.values()]
        OPTIONS[name] = {p.name: (_flags(p), domains[p.name]) for p in [*own, *tail]}
        GROUPS[name] = groups

        def run(**kw):
            ctx = kw.pop("click_context")
            if wants_ctx:
                kw["ctx"] = ctx
            typed = {g.table: {} for g in groups}
            for name_, (table, f, _) in generated.items():
                value = kw.pop(name_, None)
                source = ctx.get_parameter_source(name_)
                if source is not None and source.name in TYPED and value is not None:
                    typed[table][name_] = domain_of(f).coerce(value)
            config = kw.pop("config", None)
            from_file = read_toml_tables(config, {g.table: g.cls for g in groups}, ignored_tables)
            fields = {t: {**from_file.get(t, {}), **values} for t, values in typed.items()}
            return fn(**kw, fields=fields, config=config)

        context = inspect.Parameter("click_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        run.__signature__ = inspect.Signature([*own, context, *tail])
        run.__doc__, run.__name__ = escape(fn.__doc__ or ""), fn.__name__
        app.command(name, **settings)(run)
        return fn
    return wrap
