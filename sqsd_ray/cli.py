"""``sqsd-ray`` command line: thin verbs over library functions.

    sqsd-ray score --config jobs/score_tiny.yaml [--set data.max_length=256 ...]
    sqsd-ray score --help-config          # every config key with its type, default and help
    sqsd-ray quickstart [--out runs/quickstart]   # the embedded default: tiny model, real corpus, end to end
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, describe, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.max_length=512 (repeatable)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")


def cmd_score(args: argparse.Namespace) -> int:
    from .score_run import ScoreJobConfig, run_score

    if args.help_config:
        print("\n".join(describe(ScoreJobConfig)))
        return 0
    cfg = load_config(ScoreJobConfig, args.config, args.overrides)
    path = run_score(cfg)
    print(f"wrote {path}")
    summary = path.parent / "summary.md"
    if summary.exists():
        print(summary.read_text())
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    path = run_quickstart(Path(args.out), Path(args.data_root), overrides=args.overrides)
    print(f"wrote {path}")
    print((path.parent / "summary.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqsd-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score every sample of a corpus with SQSD (writes Parquet + summary)")
    _add_config_args(score)
    score.set_defaults(func=cmd_score)

    quick = sub.add_parser("quickstart", help="embedded default: build directions on a tiny model, score Dolly")
    quick.add_argument("--out", default="runs/quickstart", help="run directory")
    quick.add_argument("--data-root", default="../shared/data", help="folder holding benign/ and eval/")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a score config key")
    quick.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # data errors, direction mismatches: messages name the record / module
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
