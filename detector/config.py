"""Configs as data: ModelConfig (the architecture of a GFL detector), and the few rules every
config dataclass of the project follows.

Every field of a config is declared with param(default, help): the one place where an option's
default and meaning are written. The CLI turns each field into the kebab-case flag of its name
(--base-width <-> base_width), shows that help and default, and a TOML table of --config sets the
same fields. Configs are frozen and validate themselves in __post_init__.

ModelConfig's defaults are mmdetection's GFL configuration (R-50, 256 channels, 4 stacked convs,
reg_max 16, P3-P7 at strides 8-128, 80 classes). The small-model options (base_width,
fpn_channels, head_channels, stacked_convs) shrink the network for CPU work without changing any
state-dict key name, so small and full-size models share one checkpoint format.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path

from detector.errors import UserError


def param(default=MISSING, help: str = "", *, factory=None, shown: str | None = None, parse=None, flag: bool = True):
    """A config field with its help text. shown: the default as the CLI should print it (when the
    value alone would mislead, e.g. None meaning "resolved later"); parse: text -> value for a
    field whose CLI form is a string (e.g. "1333,800" for a pair); flag=False: not a flag."""
    metadata = {"help": help, "shown": shown, "parse": parse, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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


def parsed_value(f: Field, value):
    """A value for field f as a flag or a TOML entry gave it: lists become tuples, text of a field
    with a parser is parsed ("1333,800" -> (1333, 800))."""
    parse = f.metadata.get("parse")
    if isinstance(value, list):
        return tuple(value)
    return parse(value) if parse and isinstance(value, str) else value


def read_toml_tables(path: Path | None, known: dict[str, type], ignored=()) -> dict[str, dict]:
    """The tables of a --config TOML file, each for the config class `known` maps its name to;
    values parsed as their fields expect. An unknown table is an error (tables in `ignored` are
    another command's, skipped); unknown keys are left for build_config to name."""
    if path is None:
        return {}
    try:
        tables = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML ({err}); fix it") from None
    unknown = sorted(set(tables) - set(known) - set(ignored))
    if unknown:
        raise UserError(f"config file {path} has unknown tables {unknown}; use {', '.join(f'[{t}]' for t in known)}")
    out = {}
    for table, values in tables.items():
        if table in known:
            by_name = {f.name: f for f in fields(known[table])}
            out[table] = {k: parsed_value(by_name[k], v) if k in by_name else v for k, v in values.items()}
    return out


def config_to_dict(config) -> dict:
    """A config as JSON-able data (tuples as lists), as saved beside every output."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {k: plain(v) for k, v in asdict(config).items()}


def parse_pair(text: str, name: str = "value") -> tuple[int, int]:
    """'1333,800' (or '1333x800') -> (1333, 800)."""
    try:
        a, b = (int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"{name} must be two integers LONG,SHORT such as 1333,800, got {text!r}") from None
    return a, b


def parse_pairs(text: str, name: str = "value") -> tuple[tuple[int, int], ...]:
    """'1333,800;1000,600' -> ((1333, 800), (1000, 600)); '' -> ()."""
    return tuple(parse_pair(part, name) for part in str(text).split(";") if part.strip())


def parse_ints(text: str, name: str = "value") -> tuple[int, ...]:
    """'8,11' -> (8, 11)."""
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UserError(f"{name} must be a comma list of integers such as 8,11, got {text!r}") from None

RESNET_DEPTHS = (18, 34, 50, 101)
GFL_STRIDES = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class ModelConfig:
    depth: int = param(50, "ResNet depth: 18, 34, 50 or 101")
    num_classes: int = param(80, "foreground classes (sigmoid, no background channel)", shown="the dataset's")
    base_width: int = param(64, "ResNet stem channels; stages use 1, 2, 4, 8 times this (64 = standard)")
    fpn_channels: int = param(256, "FPN output channels (= head input channels)")
    head_channels: int = param(256, "channels of the GFL head's cls and reg towers")
    stacked_convs: int = param(4, "convs per head tower")
    gn_groups: int = param(32, "GroupNorm groups in the head towers")
    reg_max: int = param(16, "box distributions have reg_max + 1 bins per edge")
    strides: tuple[int, ...] = param(GFL_STRIDES, "FPN strides P3-P7", flag=False)
    frozen_stages: int = param(1, "stem + this many ResNet stages get no gradient (0 when training from scratch)")
    norm_eval: bool = param(True, "keep backbone BatchNorm in eval mode (pretrained backbones)")

    def __post_init__(self):
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        problems = []
        if self.depth not in RESNET_DEPTHS:
            problems.append(f"depth must be one of {RESNET_DEPTHS}, got {self.depth}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.base_width < 1 or self.fpn_channels < 1 or self.head_channels < 1:
            problems.append("base_width, fpn_channels and head_channels must be positive")
        if self.stacked_convs < 0:
            problems.append(f"stacked_convs must be >= 0, got {self.stacked_convs}")
        if self.stacked_convs > 0 and (self.head_channels % self.gn_groups or self.head_channels < 2 * self.gn_groups):
            # Two channels per group at least: a group of one channel on a 1x1 map (P7 of a small
            # image) has a single value, which GroupNorm cannot normalise while training.
            problems.append(f"head_channels ({self.head_channels}) must be a multiple of gn_groups "
                            f"({self.gn_groups}) with at least 2 channels per group")
        if self.reg_max < 1:
            problems.append(f"reg_max must be >= 1, got {self.reg_max}")
        if self.strides != GFL_STRIDES:
            problems.append(f"strides must be {GFL_STRIDES} (FPN P3-P7), got {self.strides}")
        if not 0 <= self.frozen_stages <= 4:
            problems.append(f"frozen_stages must be in 0..4, got {self.frozen_stages}")
        check(problems, "model configuration")

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def box_channels(self) -> int:
        return 4 * (self.reg_max + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return build_config(cls, d, "model")


# The fields that describe a trained network (what a checkpoint may not record, e.g. mmdetection's).
ARCH_FIELDS = ("depth", "base_width", "fpn_channels", "head_channels", "stacked_convs", "gn_groups", "reg_max",
               "num_classes")
