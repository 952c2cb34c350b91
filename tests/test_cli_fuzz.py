"""Every option of every command, given bad values drawn by hypothesis, through the real command
line in-process: exit 2, one `error:` line naming the option (no traceback, at most a few lines),
and nothing written anywhere. The options come from the CLI's own registry (cli_options.OPTIONS,
checked against the click commands), the bad values from each option's domain class, so a new
option is fuzzed without editing this file, and a new kind of domain fails here until it says
what its bad values are. --config TOML files get wrong types, out-of-range values and broken
files the same way, field by field."""

from __future__ import annotations

import contextlib
import io
import os
import string
import tempfile
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from cli_options import GROUPS, OPTIONS
from core import domains as d
from core import paths, runtime
from core.config import domain_of
from data import views
from tests.conftest import TINY_MODEL_FLAGS

# A fixed, reproducible budget: the whole file runs in well under a minute on 2 cores.
FUZZ = settings(max_examples=6, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# Each command's positional arguments, in order.
POSITIONAL = {"make-synthetic": ("out",), "inspect-cache": ("store",), "plot": ("runs",),
              "predict": ("checkpoint", "inputs"), "export": ("checkpoint",)}


# ---- running a command as a user does, in-process ------------------------------------------------
def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([str(a) for a in argv])
                code = 0
            except SystemExit as stop:
                code = stop.code
    finally:
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def world(tiny_coco, tiny_teacher, tiny_cache, tmp_path_factory):
    """Valid inputs every command can start from, and a home for the synthetic default that must
    stay empty (a bad value must not cost its generation)."""
    run_dir = tmp_path_factory.mktemp("a-run")
    (run_dir / "metrics.jsonl").write_text('{"iter": 1, "epoch": 1, "loss": 1.0}\n')
    home = tmp_path_factory.mktemp("ldcache-home")
    data = ["--images", tiny_coco["images"], "--ann", tiny_coco["ann"]]
    train = ["--max-iters", "1", "--workers", "0", "--batch-size", "2", "--no-tensorboard", *TINY_MODEL_FLAGS]
    base = {  # a valid call of each command (what the bad value is added to)
        "make-synthetic": ["--num-train", "2", "--num-val", "1", "--image-size", "64"],
        "train-detector": [*data, "--img-scale", "64,64", *train, "--out", "run"],
        "train-student": [*data, "--cache", tiny_cache, *train, "--out", "run"],
        "evaluate": ["--checkpoint", tiny_teacher["path"], "--images", tiny_coco["val_images"], "--ann",
                     tiny_coco["val_ann"], "--workers", "0", "--out", "res.json"],
        "dump-teacher": ["--teacher", tiny_teacher["path"], *data, "--img-scale", "64,64", "--workers", "0",
                         "--out", "c.zarr"],
        "inspect-cache": [],
        "demo": ["--workdir", "demo", "--quick", "--workers", "0"],
        "sweep": ["--cache", tiny_cache, "--grid", "ld_weight=0.5", "--out", "sweep"],
        "plot": ["--out", "p.png"],
        "predict": ["--img-scale", "64,64", "--workers", "0", "--out", "pred"],
        "export": ["--format", "torchscript", "--out", "model.pt"],
    }
    positional = {"make-synthetic": {"out": "synthetic"}, "inspect-cache": {"store": str(tiny_cache)},
                  "plot": {"runs": str(run_dir)},
                  "predict": {"checkpoint": str(tiny_teacher["path"]), "inputs": str(tiny_coco["val_images"])},
                  "export": {"checkpoint": str(tiny_teacher["path"])}}
    return {"base": base, "positional": positional, "home": home,
            "watched": [Path(tiny_coco["root"]), Path(tiny_cache), run_dir, Path(tiny_teacher["path"]).parent]}


def assert_refused(world, command: str, name: str, value, must_name: tuple[str, ...] | None = None):
    """Run `command` with option `name` set to `value` (text, or a callable of the scratch folder),
    and check the refusal; the error line names the option (or its value), or must_name."""
    flags, _ = OPTIONS[command][name]
    before = [tree(w) for w in world["watched"]]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "a-file").write_text("x")
        (scratch / "a-folder").mkdir()
        value = value(scratch) if callable(value) else value
        argv = [command]
        for positional in POSITIONAL.get(command, ()):
            argv.append(value if name == positional else world["positional"][command][positional])
        argv += world["base"][command]
        if name not in POSITIONAL.get(command, ()):
            argv += [value] if str(value).startswith("--") else [flags[0], value]
        old = os.environ.get("LDCACHE_HOME")
        os.environ["LDCACHE_HOME"] = str(world["home"])
        try:
            code, out, err = run(argv, scratch)
        finally:
            os.environ.pop("LDCACHE_HOME") if old is None else os.environ.__setitem__("LDCACHE_HOME", old)
        written = sorted(set(tree(scratch)) - {"a-file", "a-folder", "bad.toml"})
    lines = [line for line in err.splitlines() if line.strip()]
    context = f"{argv}\nstdout: {out[-500:]}\nstderr: {err[-1500:]}"
    assert code == 2, context
    assert "Traceback" not in out + err, context
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: ") and len(lines[-1]) < 600, context
    named = must_name or (*flags, name, name.replace("_", "-"), str(value))
    assert any(n in lines[-1] for n in named), f"the error does not name {name}: {context}"
    assert written == [], f"{written} written: {context}"
    assert [tree(w) for w in world["watched"]] == before, context
    assert list(world["home"].iterdir()) == [], f"the synthetic default was generated: {context}"


# ---- bad values for each kind of domain ------------------------------------------------------------
WORDS = st.text(alphabet=string.ascii_letters + "-_", min_size=1, max_size=10)
JUNK = st.sampled_from(["", " ", "abc", "1,2", "--", "nan", "None"])


def outside(r: d.Range) -> st.SearchStrategy:
    """Numbers just or far outside a Range, and texts that are no number of its kind."""
    parts = [JUNK]
    if r.integer:
        if r.low is not None:
            parts.append(st.integers(max_value=int(r.low) - (0 if r.low_open else 1)))
        if r.high is not None:
            parts.append(st.integers(min_value=int(r.high) + (0 if r.high_open else 1)))
        parts.append(st.sampled_from(["1.5", "1e3", "0x10"]))
    else:
        if r.low is not None:
            parts.append(st.floats(max_value=r.low, exclude_max=not r.low_open, allow_nan=False, allow_infinity=False))
        if r.high is not None:
            parts.append(st.floats(min_value=r.high, exclude_min=not r.high_open, allow_nan=False,
                                   allow_infinity=False))
        parts.append(st.sampled_from(["inf", "-inf", "1e999", "1..2"]))
    return st.one_of(*parts).map(str)


def path_of(kind: str):
    """A path in the scratch folder, chosen when the command runs."""
    return {"missing": lambda s: str(s / "missing" / "x"), "file": lambda s: str(s / "a-file"),
            "folder": lambda s: str(s / "a-folder"), "below-file": lambda s: str(s / "a-file" / "x"),
            "empty": lambda s: ""}[kind]


def bad_texts(domain: d.Domain) -> st.SearchStrategy:
    """Values a user may type that the domain must refuse, drawn without asking the domain."""
    if isinstance(domain, d.Range):
        return outside(domain)
    if isinstance(domain, d.OneOf):
        names = [str(c) for c in domain.choices]
        mutated = st.sampled_from(names).flatmap(lambda c: st.sampled_from([c.upper() + "X", c + "x", "no-" + c, ""]))
        return st.one_of(mutated, WORDS.filter(lambda w: w not in names))
    if isinstance(domain, views.Scale):
        smaller_long = st.tuples(st.integers(1, 5000), st.integers(1, 5000)).filter(lambda p: p[0] < p[1])
        return st.one_of(smaller_long.map(lambda p: f"{p[0]},{p[1]}"),
                         st.integers(-5, 0).map(lambda s: f"100,{s}"),
                         st.integers(views.MAX_SIDE + 1, 10**9).map(lambda s: f"{s},100"),
                         st.sampled_from(["1333", "1333,800,600", "a,b", "1333,", ",800", "", "1333;800", "1.5,1"]))
    if isinstance(domain, views.Scales):
        return st.sampled_from(["1333,800;800,1333", "abc", "1333,800;x", "0,0", "1333"])
    if isinstance(domain, d.Ints):
        return st.sampled_from(["8,x", "0", "-1", ",", "8,,0", "1.5"])
    if isinstance(domain, views.Views):
        return st.one_of(st.sampled_from(["vflip", "orig,vflip", ",", "", "orig,,hflip", "ORIG"]), WORDS)
    if isinstance(domain, runtime.Device):
        return st.sampled_from(["gpu", "cuda:x", "cuda:-1", "tpu", "", "cuda:1.5", "CPU", "cuda:"])
    if isinstance(domain, runtime.DeviceList):
        return st.sampled_from(["a,b", "0,0", "-1", "0,,1", "gpu", "1.5"])
    if isinstance(domain, d.JsonObject):
        return st.sampled_from(["{", "[1, 2]", "null", "3", "", "{'a': 1}"])
    if isinstance(domain, d.Flag):
        return st.sampled_from(["yes", "1", "false", ""])
    if isinstance(domain, (paths.InputFile, paths.InputDir)):
        wrong = "folder" if isinstance(domain, paths.InputFile) else "file"
        return st.sampled_from(["missing", wrong, "empty"]).map(path_of)
    if isinstance(domain, paths.OutputPath):
        wrong = "file" if domain.kind == "dir" else "folder"
        return st.sampled_from([wrong, "below-file", "empty"]).map(path_of)
    if isinstance(domain, d.Texts):
        return st.sampled_from(["", " "])
    if isinstance(domain, d.Text):  # a cache location: nothing, or a path that holds no cache
        return st.sampled_from(["empty", "missing", "file", "folder"]).map(path_of)
    raise AssertionError(f"no bad values for {type(domain).__name__}: say what they are here")


# Values that are bad for what one option means, beyond its domain's kind.
MEANING = {("sweep", "grid"): ["ld_weight", "bogus=1", "ld_weight=-1", "epochs=0", "weight_sum_clamp=maybe",
                               "ld_weight=", "img_scale=800x1333", "views=vflip"]}


# ---- the tests -------------------------------------------------------------------------------------
def test_the_registry_is_every_option_of_every_command():
    group = typer.main.get_command(cli.app)
    for name, command in group.commands.items():
        assert {p.name for p in command.params} == set(OPTIONS[name]), name
    assert set(OPTIONS) == set(group.commands)


CASES = [(c, n) for c, options in OPTIONS.items() for n in options]


@pytest.mark.parametrize("command, name", CASES, ids=[f"{c}:{n}" for c, n in CASES])
def test_a_bad_value_of_any_option_is_one_line_exit_2_and_nothing_written(world, command, name):
    flags, domain = OPTIONS[command][name]
    if isinstance(domain, d.Flag):  # an on/off flag takes no value: --flag=VALUE is the bad input
        values = st.tuples(st.sampled_from([f for f in flags if f.startswith("--")]), bad_texts(domain)).map(
            lambda fv: f"{fv[0]}={fv[1]}")
    else:
        values = st.one_of(bad_texts(domain), st.sampled_from(MEANING.get((command, name), [None])))
        values = values.filter(lambda v: v is not None)

    @FUZZ
    @given(value=values)
    def check(value):
        assert_refused(world, command, name, value)

    check()


def toml_bad_values(domain: d.Domain) -> st.SearchStrategy:
    """TOML texts of values of the wrong type or outside the domain."""
    wrong_type = st.sampled_from(['"abc"', "true", "[1]", "{ a = 1 }", "1.5", "-7"])
    if isinstance(domain, d.Range):
        return st.one_of(wrong_type.filter(lambda t: not (t in ("1.5", "-7") and domain.valid(float(t)))),
                         outside(domain).filter(lambda t: t not in ("", " ", "abc", "1,2", "--", "None", "1..2",
                                                                    "0x10", "1e999", "1e3")))
    if isinstance(domain, d.Flag):
        return st.sampled_from(['"yes"', "1", "0", '"true"'])
    if isinstance(domain, views.Scale):
        return st.sampled_from(["[800, 1333]", "[1]", '"abc"', "5", "[1.5, 1]", "[0, 0]"])
    if isinstance(domain, (views.Scales, d.Ints, d.Texts)):
        return st.sampled_from(['[""]', '["a"]', "[[1, 2]]", "[0]", "true"])
    if isinstance(domain, (paths.InputFile, paths.InputDir, paths.OutputPath)):
        return st.sampled_from(['""', "5", '"/nonexistent/x/y"' if not isinstance(domain, paths.OutputPath)
                                else '"/etc/hostname/x"'])
    if isinstance(domain, runtime.DeviceList):  # empty is its default (no GPU)
        return st.sampled_from(["5", "true", '"a,b"', "[1]"])
    return st.sampled_from(["5", "true", '""', '"bogus-name"', "[1]"])


def _toml_cases():
    for command, groups in GROUPS.items():
        for group in groups:
            for f in group.fields():
                yield command, group.table, f


TOML_CASES = list(_toml_cases())


@pytest.mark.parametrize("command, table, field", TOML_CASES, ids=[f"{c}:[{t}].{f.name}" for c, t, f in TOML_CASES])
def test_a_toml_value_of_the_wrong_type_or_range_is_refused_naming_it(world, command, table, field):
    values = toml_bad_values(domain_of(field))
    if (command, field.name) in MEANING:
        values = st.one_of(values, st.sampled_from([f'["{v}"]' for v in MEANING[(command, field.name)]]))

    @settings(FUZZ, max_examples=3)
    @given(value=values)
    def check(value):
        def config(scratch: Path) -> str:
            (scratch / "bad.toml").write_text(f"[{table}]\n{field.name} = {value}\n")
            return str(scratch / "bad.toml")
        assert_refused(world, command, "config", config, must_name=(field.name,))

    check()


@pytest.mark.parametrize("text", ["[train\nepochs = 1", "[bogus]\nx = 1\n", "[train]\nbogus = 1\n", "train = 5\n",
                                  b"\xff\xfe[train]"])
def test_a_broken_toml_file_is_refused(world, text):
    def config(scratch: Path) -> str:
        path = scratch / "bad.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)
    assert_refused(world, "train-detector", "config", config, must_name=("bad.toml",))
