"""A settings dataclass as a command line: one flag per field, with its comment as the help and its default shown.

Every script keeps its settings in a dataclass at its top (train.py's TrainConfig, sample.py's SampleConfig, ...):

    cfg = cli.parse(TrainConfig, argv, __doc__)

makes `--lr-vision` of `lr_vision: float | None = None  # per-part learning rates; None = lr`: bools become
--x / --no-x, lists one or more values (the flag repeated, or several after it), `Literal[...]` a choice, and a
comment line `# -- data` inside the class starts a group of flags in --help. A field without a default is a
required flag. A settings class may check its values in __post_init__: a ValueError there becomes a one-line
usage error (exit status 2), before anything else runs. This file imports nothing heavy, so a script that parses
before importing torch answers --help at once.
"""
import argparse
import dataclasses
import inspect
import re
import types
import typing

FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s?(.*))?$")
GROUP = re.compile(r"^\s+# -- (.+)$")
MORE = re.compile(r"^\s+#\s?(.*)$")


def comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """Each field's help (its trailing comment and the comment lines after it) and its group, from the source."""
    helps, groups, name, group = {}, {}, None, ""
    for line in inspect.getsource(cls).splitlines()[1:]:
        if m := GROUP.match(line):
            group, name = m[1], None
        elif (m := MORE.match(line)) and name:
            helps[name] = (helps[name] + " " + m[1]).strip()
        elif m := FIELD.match(line):
            name, helps[m[1]], groups[m[1]] = m[1], m[2] or "", group
        else:
            name = None
    return helps, groups


def parser(cls, description: str = "") -> argparse.ArgumentParser:
    return add_flags(argparse.ArgumentParser(description=description, formatter_class=Formatter), cls)


def add_flags(p: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """One flag per field of the settings dataclass `cls` on the parser `p` (or a subcommand's)."""
    helps, groups = comments(cls)
    hints = typing.get_type_hints(cls)
    sections = {}
    for f in dataclasses.fields(cls):
        group = groups.get(f.name, "")
        if group not in sections:
            sections[group] = p.add_argument_group(group) if group else p
        kind = hints[f.name]
        args = [t for t in typing.get_args(kind) if t is not type(None)]  # X | None -> X
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = args[0]
        kw = dict(help=helps.get(f.name, ""))
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        else:
            kw["required"] = True
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:  # --image a --image b and --image a b alike; None: the default
            shown = kw.pop("default", [])
            kw.update(nargs="+", action="extend", type=typing.get_args(kind)[0], default=None,
                      help=kw["help"] + (f" (default: {' '.join(map(str, shown))})" if shown else ""))
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            kw.update(choices=choices, type=type(choices[0]))
        else:
            kw["type"] = kind
        sections[group].add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def at_least(settings, low: float, *names: str, strict: bool = False) -> None:
    """For a settings class's __post_init__: each named field (None skipped) >= low (> low with strict), or a
    ValueError naming its flag."""
    for name in names:
        v = getattr(settings, name)
        if v is not None and (v <= low if strict else v < low):
            want = f"above {low}" if strict else "0 or more" if low == 0 else f"at least {low}"
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be {want}")


def settings(cls, parsed: argparse.Namespace, p: argparse.ArgumentParser):
    """The dataclass from parsed flags; its own checks (__post_init__) fail as usage errors."""
    try:
        return cls(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls)
                      if getattr(parsed, f.name) is not None or f.default is None})
    except ValueError as e:
        p.error(str(e))


def parse(cls, argv=None, description: str = ""):
    """The settings from the command line (sys.argv by default)."""
    p = parser(cls, description)
    return settings(cls, p.parse_args(argv), p)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and every flag's default beside its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, [], "") and not action.required and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text
