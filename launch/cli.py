"""The `gwtf` command line: a thin dispatcher over the modules that own each command.

Every command module exposes `add_arguments(parser, command)` and `run(args) -> int` (`args._command` names
the command, for modules that own several). Errors a user can fix (a missing
file, a wrong config, an unreachable peer) are raised as `gwtf.errors.UserError` and end as one line on stderr
with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gwtf.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gwtf.launch.local_swarm", "run a local swarm on 127.0.0.1 with a crash injected and recovered"),
    "bootstrap": ("gwtf.launch.bootstrap", "start a run: DHT peer and run record; prints the address to join"),
    "join": ("gwtf.launch.join", "join a run as a relay or data node"),
    "doctor": ("gwtf.launch.doctor", "can the peers of a run reach this machine? (run it where you would join)"),
    "status": ("gwtf.launch.status", "print the stages, replicas and data nodes of a run"),
    "dashboard": ("gwtf.launch.dashboard", "serve a live web page of a run: pipeline, flows, gap to the optimum, loss"),
    "train-local": ("gwtf.launch.train_local", "single-process reference training"),
    "convert": ("gwtf.launch.convert", "convert a HF directory or GGUF file into a staged checkpoint"),
    "export": ("gwtf.launch.convert", "export a staged checkpoint as a Hugging Face directory"),
    "finetune": ("gwtf.launch.finetune", "fine-tune a pretrained checkpoint on a local swarm and export it"),
    "generate": ("gwtf.launch.generate", "try a fine-tuned model: continue prompts, or chat with it"),
}


def not_given(default: object) -> bool:
    """A default that means "the flag was not given" (None, a switch's False, an empty list), not a value."""
    return default is None or default is False or default == [] or default == argparse.SUPPRESS


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default where the help does not say it already (None, False and [] are
    "not given": the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = not action.option_strings or not_given(action.default)
        return text if quiet or "default" in text else f"{text} (default: %(default)s)"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Every command is listed; only the selected one's module is imported (one broken module breaks one command)."""
    parser = argparse.ArgumentParser(prog="gwtf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        cmd.set_defaults(_module=module_name, _command=name)
        module = _import_command(module_name) if name == selected else None
        if module is not None:
            module.add_arguments(cmd, name)
    return parser


def _import_command(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # the command is not built yet: it is listed but refuses to run
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(selected).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = _import_command(args._module)
    if module is None:
        print(f"gwtf {args._command}: not available in this version", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"gwtf {args._command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gwtf {args._command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
