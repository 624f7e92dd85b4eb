r"""The one way every command runs: absl flags, `--config.a.b=v` overrides, `--help`, clean errors.

A command module (train, evaluate, crossval, models, ...) does three things:

    from absl import flags
    from diff_fastener_jax import cli

    FLAGS = flags.FLAGS

    def define_flags():                      # called by cli.run, so importing the module defines
        cli.define_config("file")            # no flags (commands import each other's functions)
        flags.DEFINE_string("workdir", None, "run folder")
        # cli.define_config("run") instead: no file, the config saved in --workdir (config.json)

    def main(argv):                          # absl-style: argv holds only the program name
        from diff_fastener_jax.training.loop import train_and_evaluate   # JAX: see below
        config = cli.get_config(workdir=FLAGS.workdir)   # overrides applied, validated
        ...
        return 0

    if __name__ == "__main__":
        cli.run(main, __doc__, define_flags=define_flags, required=("config", "workdir"))

The module docstring is the --help text: start it with a one-line summary, then a
`python -m diff_fastener_jax.<cmd> ...` usage line and an `Example:` block.

What every command then gets:

  * `--config.KEY=VALUE` overrides of any schema key (ml_collections `config_flags`, typed by the
    key's current value: `--config.train.num_steps=100`, `--config.model.channel_mults='(1,2)'`),
    on top of the config file or, for "run" commands, on top of the run's config.json. An unknown key
    fails before anything runs, with a "did you mean ...?" hint (difflib over the schema's keys).
  * `--help` (`-h`): `usage: python -m diff_fastener_jax.<cmd> ...`, the module docstring (its usage
    lines and an example) and the command's flags; exits 0.
  * `--print_config`: `get_config` prints the resolved, validated config as JSON and exits 0.
  * Expected mistakes end as ONE `error: <what and where>` line, optionally followed by one
    `hint: <how to fix>` line, on stderr with exit status 2 and no traceback: any `errors.UserError`
    raised by the command (ConfigError, DatasetError, IncompatibleCheckpointError, ...), a missing
    --config file, unknown or ill-typed overrides and flags, a --workdir / --out that is a file,
    absl `app.UsageError`. `--verbose` (or the environment variable `DFJ_VERBOSE=1`) prints the
    traceback first. Anything else is a bug and keeps its traceback (exit 1).
  * A missing training stack (JAX, Flax, ...: `errors.TRAINING_STACK`, the `train` extra) ends as
    one `error: <command> needs the training stack ...` line naming the extra to install, exit 2.
    Commands import the training stack inside `main` (or `define_flags`), not at module level, so
    that this holds for `python -m diff_fastener_jax.<cmd>` too: an inspection PC with only the
    `runtime` extra runs predict/serve on export folders and gets this line from the rest.
  * `DFJ_HUGEPAGES=1`: the command re-executes itself once with malloc huge pages (`perf.hostenv`).

Public API: `run`, `define_config`, `get_config`, `fail`, `needs_training_stack`, `EXIT_USER_ERROR`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback

from absl import app, flags, logging

from diff_fastener_jax import config as config_lib
from diff_fastener_jax.errors import TrainingStackMissing, UserError
from diff_fastener_jax.perf import hostenv

EXIT_USER_ERROR = 2
FLAGS = flags.FLAGS

_SOURCE: dict[str, str] = {}  # config flag name -> "file" | "run"
_HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-?")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=\s]+)")
_FOLDER_FLAGS = ("workdir", "out")  # flags that name a folder to read or write


def _define_common_flags() -> None:
    if "print_config" not in FLAGS:
        flags.DEFINE_bool("print_config", False, "print the resolved config (JSON) and exit")
    if "verbose" not in FLAGS:
        flags.DEFINE_bool("verbose", False, "show the traceback of an error (or set DFJ_VERBOSE=1)")


def define_config(source: str = "file", name: str = "config"):
    """Defines `--config` (+ `--config.KEY=VALUE` overrides, `--print_config`, `--verbose`); returns its holder.

    source="file": `--config path/to/config.py[:preset]` (ml_collections DEFINE_config_file).
    source="run":  no file; overrides are typed against the schema and later applied by `get_config`
                   on top of `<workdir>/config.json`.
    Idempotent: a second call (a command importing another command's module) returns the same flag.
    """
    if source not in ("file", "run"):
        raise ValueError(f"source must be 'file' or 'run', got {source!r}")
    from ml_collections import config_flags

    _define_common_flags()
    if name in FLAGS:
        return flags.FlagHolder(FLAGS, FLAGS[name])
    _SOURCE[name] = source
    if source == "file":
        return config_flags.DEFINE_config_file(
            name, None, "config file: configs/<x>.py[:preset]; override keys with --config.KEY=VALUE", lock_config=True
        )
    return config_flags.DEFINE_config_dict(
        name,
        config_lib.base_config(),
        "override keys of the run's saved config with --config.KEY=VALUE",
        lock_config=True,
    )


def get_config(workdir: str | None = None, *, name: str = "config", validate: bool = True, check_data: bool = True):
    """The command's resolved config: the --config file (or `<workdir>/config.json` for "run" commands)
    with the command line's overrides applied, validated (`config.validate_config`).

    With `--print_config` it prints that config as JSON and exits 0. Raises ConfigError (a UserError)
    for a missing run, unknown keys or invalid values. `check_data=False` skips the checks of the data
    location (data.root, data.category): for commands that read no dataset (benchmark).
    """
    if _SOURCE.get(name, "file") == "run":
        if not workdir:
            raise app.UsageError("--workdir is required")
        cfg = config_lib.config_from_json(os.path.join(workdir, "config.json"))
        config_lib.apply_overrides(cfg, dict(FLAGS[name].override_values))
        config_lib.refuse_auto_on_trained_run(cfg)
    else:
        cfg = FLAGS[name].value
        if cfg is None:
            raise app.UsageError(f"--{name} is required (e.g. --{name} configs/demo.py)")
    if validate:
        config_lib.validate_config(cfg, check_data=check_data)
    if FLAGS["print_config"].present and FLAGS.print_config:
        try:
            print(cfg.to_json_best_effort(indent=2), flush=True)
        except BrokenPipeError:  # `--print_config | head`
            pass
        sys.exit(0)
    return cfg


def fail(message: str, hint: str | None = None, *, exc: BaseException | None = None) -> None:
    """Prints `error: message` (+ `hint: hint`) on stderr and exits with status 2; with --verbose or
    DFJ_VERBOSE=1 the traceback of `exc` comes first."""
    if exc is not None and _verbose():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = " ".join(str(message).split("\n")).strip() or type(exc).__name__
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {' '.join(str(hint).split())}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def needs_training_stack():
    """Ends a ModuleNotFoundError of the training stack (jax, flax, ...) raised inside the block as one
    `error: <command> needs the training stack ...` line (`fail`); other import errors propagate."""
    try:
        yield
    except ModuleNotFoundError as e:
        missing = TrainingStackMissing.from_import_error(prog_name(), e)
        if missing is None:
            raise
        fail(str(missing), exc=e)


def _verbose(argv=None) -> bool:
    if os.environ.get("DFJ_VERBOSE", "").strip() not in ("", "0", "false", "False"):
        return True
    if argv is None and FLAGS.is_parsed() and "verbose" in FLAGS:
        return bool(FLAGS.verbose)
    return "--verbose" in (argv if argv is not None else sys.argv)


# "diff-fastener <cmd>" when the console command (diff_fastener_jax/__main__.py) runs a command.
PROGRAM_NAME: str | None = None


def prog_name() -> str:
    """`python -m diff_fastener_jax.<cmd>` (or `diff-fastener <cmd>`) for the running command."""
    if PROGRAM_NAME:
        return PROGRAM_NAME
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return f"python {os.path.basename(sys.argv[0])}"


def _flag_line(flag) -> str:
    value = "" if flag.boolean else f"={flag.name.upper()}" if flag.name not in _SOURCE else " FILE[:PRESET]"
    default = "" if flag.default in (None, False, "") or flag.name in _SOURCE else f" (default: {flag.default})"
    return f"  --{flag.name}{value}\n      {flag.help}{default}"


def help_text(doc: str, show: tuple[str, ...] = ()) -> str:
    """The `--help` page: usage line, the module docstring, the command's own flags, the common flags."""
    main_module = sys.argv[0]
    own = []
    for module, module_flags in FLAGS.flags_by_module_dict().items():
        if module == main_module or os.path.abspath(module) == os.path.abspath(main_module):
            own += [f for f in module_flags if "." not in f.name]
    own += [FLAGS[n] for n in show if n in FLAGS and FLAGS[n] not in own]
    common = ("print_config", "verbose")
    own = [f for i, f in enumerate(own) if f not in own[:i] and f.name not in common and f.name not in _SOURCE]
    config_flags_ = [FLAGS[n] for n in _SOURCE if n in FLAGS]
    lines = [f"usage: {prog_name()} [flags]" + (" [--config.KEY=VALUE ...]" if config_flags_ else ""), ""]
    lines += [(doc or "").strip(), "", "flags:"]
    for f in config_flags_:
        if _SOURCE[f.name] == "file":
            lines.append(_flag_line(f))
    lines += [_flag_line(f) for f in own]
    if config_flags_:
        source = "the --config file" if _SOURCE[config_flags_[0].name] == "file" else "the run's config.json"
        lines += [
            "  --config.KEY=VALUE",
            f"      override one key of {source} (repeatable), e.g. --config.train.num_steps=100;",
            "      every key: diff_fastener_jax/config_schema.py or --print_config",
        ]
    lines += [_flag_line(FLAGS[n]) for n in common if n in FLAGS]
    lines += ["", "errors end with one 'error:' line (and a 'hint:' line), exit status 2."]
    return "\n".join(lines)


def _precheck(argv: list[str], required: tuple[str, ...]) -> None:
    """Mistakes found before absl parses: a missing --config file or flag, an override without a file
    (unknown override keys are refused before the flags are defined, in `run`)."""
    args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    keys = [m.group(1) for a in args if (m := _OVERRIDE.match(a))]
    for name, source in _SOURCE.items():
        if source != "file":
            continue
        value = None
        for i, a in enumerate(args):
            if a in (f"--{name}", f"-{name}") and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith((f"--{name}=", f"-{name}=")):
                value = a.split("=", 1)[1]
        if value is None:
            if name in required:
                raise app.UsageError(f"--{name} is required (e.g. --{name} configs/demo.py)")
            if keys:
                raise app.UsageError(f"--config.{keys[0]} needs a --{name} file to override")
            continue
        path = value.partition(":")[0]
        if not os.path.isfile(path):
            raise config_lib.ConfigError(
                f"--{name} {value}: file {path} does not exist", hint=config_lib._config_files_hint(path)
            )


def _override_hint(message: str) -> str | None:
    """'expected int like 6' for an ill-typed --config.KEY=VALUE absl refused."""
    m = re.search(r"--config\.([\w.]+)", message)
    if not m:
        return None
    known = config_lib.known_keys()
    if m.group(1) in known:
        default = known[m.group(1)]
        example = config_lib.example_value(m.group(1))
        return f"{m.group(1)} expects {type(default).__name__} values, e.g. --config.{m.group(1)}={example!r}"
    return config_lib.suggest_key(m.group(1))


def check_folder_flag(name: str, path: str | None) -> None:
    """Raises UserError when --`name` (a folder to read or write) is a file, or lies below one."""
    if not path:
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.isfile(probe):
        where = "" if probe == os.path.abspath(path) else f" ({probe} is a file)"
        raise UserError(
            f"--{name} {path} is not a folder{where}", hint=f"pass a folder for --{name} (it is created if missing)"
        )


def _without_traceback(message: str) -> str:
    """ml_collections embeds the config file's traceback in its error; keep the flag and the last line."""
    if "Traceback (most recent call last)" not in message:
        return message
    head = message.split("Error whilst parsing config file")[0].split("Traceback")[0].strip().rstrip(":")
    last = [ln.strip() for ln in message.strip().splitlines() if ln.strip()][-1]
    return f"{head}: {last}" if head else last


def run(
    main,
    doc: str | None = None,
    *,
    define_flags=None,
    required: tuple[str, ...] = (),
    show: tuple[str, ...] = (),
    argv: list[str] | None = None,
    folder_flags: tuple[str, ...] = _FOLDER_FLAGS,
) -> None:
    """Runs absl-style `main(argv)` with the conventions above; never returns (exits with main's status).

    `doc` is the --help text (pass the module's `__doc__`); `define_flags()` defines the command's
    flags; `required` names flags that must be given; `show` names flags defined in other modules that
    this command uses (listed in --help); `argv` defaults to sys.argv; `folder_flags` names the flags
    that hold a folder (refused when they name a file).
    """
    if argv is None:
        hostenv.reexec_with_hugepages()  # DFJ_HUGEPAGES=1 only; before anything is parsed or loaded
    argv = list(sys.argv if argv is None else argv)
    sys.argv = argv  # ml_collections reads the overrides from sys.argv
    head = argv[: argv.index("--")] if "--" in argv else argv
    try:
        # Unknown override keys first: ml_collections reads the overrides as soon as --config is defined.
        for key in (m.group(1) for a in head[1:] if (m := _OVERRIDE.match(a))):
            config_lib.check_keys([key], where=f"--config.{key}")
    except UserError as e:
        fail(str(e), e.hint, exc=e)
    if define_flags is not None:
        with needs_training_stack():
            define_flags()
    _define_common_flags()
    if any(a in _HELP_ARGS for a in head[1:]):
        print(help_text(doc or "", show))
        sys.exit(0)
    try:
        _precheck(argv, required)
    except UserError as e:
        fail(str(e), e.hint, exc=e)
    except app.UsageError as e:
        fail(str(e), f"see {prog_name()} --help", exc=e)

    def parse(args):
        try:
            return FLAGS(args)
        except flags.Error as e:
            fail(_without_traceback(str(e)), _override_hint(str(e)) or f"see {prog_name()} --help", exc=e)
        except UserError as e:
            fail(str(e), e.hint, exc=e)
        except OSError as e:  # a config file that exists but cannot be read
            fail(f"cannot load --config: {e}", exc=e)

    def wrapped(args):
        try:
            if len(args) > 1:
                raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
            for name in required:
                if name in FLAGS and FLAGS[name].value is None:
                    raise app.UsageError(f"--{name} is required")
            for name in folder_flags:
                if name in FLAGS:
                    check_folder_flag(name, FLAGS[name].value)
            if not FLAGS["verbosity"].present:  # orbax logs every save/restore at INFO
                logging.set_verbosity(logging.WARNING)
            with needs_training_stack():
                return main(args)
        except UserError as e:
            fail(str(e), e.hint, exc=e)
        except app.UsageError as e:
            fail(str(e), f"see {prog_name()} --help", exc=e)

    app.run(wrapped, argv=argv, flags_parser=parse)
