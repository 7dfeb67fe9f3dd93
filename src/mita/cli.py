"""The ``mita`` command line: one entry point, subcommands implemented in their own packages."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help). Each module exposes ``main(argv: list[str] | None) -> int | None``.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("mita.bench", "time and memory of MiTA backends against SDPA"),
    "train": ("mita.train.cli", "train a model on a task"),
    "eval": ("mita.analysis.eval_cli", "evaluate a checkpoint (optionally with another attention, m, k)"),
    "viz": ("mita.analysis.viz", "routing/pruning/expert figures for a checkpoint"),
    "grid": ("mita.analysis.grid", "accuracy over inference m x k"),
    "swap": ("mita.analysis.swap", "train-attention x eval-attention accuracy matrix"),
    "data": ("mita.data.report", "build the datasets and report their sizes and class balance"),
    "generate": ("mita.generate", "continue a prompt with a trained GPT checkpoint"),
}


def _usage() -> str:
    lines = ["usage: mita <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`mita <command> --help` shows a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mita: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
