"""The ``selora`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes to them, importing
the one module the command line names."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "serve": ("selora.server.main", "serve embeddings and classification with many adapters over REST"),
    "inspect": ("selora.training.inspect", "summarise an adapter and draw its active-block heatmap"),
    "bench": ("selora.bench.suite", "FLOPs, latency, multi-tenant throughput and memory against PEFT, merged and base"),
    "train": ("selora.training.train", "train a sparse gated LoRA/DoRA adapter (or a baseline) on a frozen base"),
    "eval": ("selora.training.evaluate", "top-1, retention k-NN before/after, CLIP zero-shot and retrieval"),
    "keys": ("selora.server.keys", "create, list and revoke API keys of the store"),
    "store": ("selora.server.store_command", "import adapter directories into the store; per-tenant quotas"),
    "convert": ("selora.adapters.convert", "PEFT LoRA/DoRA adapters to selora and back, or one adapter merged into the base"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (for its arguments), so that help and
    start-up do not pay for every subcommand's imports (torch among them)."""
    parser = argparse.ArgumentParser(prog="selora", description="sparse, selectively gated LoRA for CLIP/DINO")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())
