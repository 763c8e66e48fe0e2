"""Command line: `python -m cluster run CONFIG [flags]`.

Joins the Ray cluster named by RAY_ADDRESS (or the one running on this machine),
else starts a local one. Problems with the input end in one line on stderr and
exit status 2; a traceback (exit status 1) always means a bug.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import logs
from common.errors import UserError, report

FLAGS = {  # flag -> config key it sets
    "model": "model.path",
    "data": "data.source",
    "num_sequences": "data.num_sequences",
    "seq_len": "data.seq_len",
    "stages": "pipeline.num_stages",
    "replicas": "pipeline.num_replicas",
    "output": "storage.output",
}


def parse(argv: list[str] | None, prog: str = "python -m cluster") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="extract activations and find outlier features")
    run.add_argument("config", help="YAML file, e.g. configs/tiny_moe.yaml")
    run.add_argument("--model", help="HF id or local checkpoint dir (model.path)")
    run.add_argument("--data", help="'stdlib', a local .txt/.jsonl/.json/.parquet, or an HF dataset id")
    run.add_argument("--num-sequences", type=int, help="data.num_sequences")
    run.add_argument("--seq-len", type=int, help="data.seq_len")
    run.add_argument("--stages", type=count_or_auto, help="pipeline.num_stages: a number, or auto")
    run.add_argument("--replicas", type=count_or_auto, help="pipeline.num_replicas: a number, or auto")
    run.add_argument("--executor", choices=["ray", "local"], default="ray",
                     help="ray (stage actors on a Ray cluster, the default) or local (one pipeline in this process)")
    run.add_argument("--output", help="run directory or URI (storage.output)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any config key, e.g. --set pipeline.micro_batch_size=2 (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue the run in --output")
    logs.add_flags(run)
    return parser.parse_args(argv)


def count_or_auto(text: str) -> int | str:
    """`auto` or a whole number, for --stages and --replicas."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number or 'auto'") from None


def overrides(args: argparse.Namespace) -> list[str]:
    """Flags as `key=value` overrides, applied before --set ones."""
    given = [
        f"{key}={json.dumps(getattr(args, flag))}"
        for flag, key in FLAGS.items() if getattr(args, flag) is not None
    ]
    return given + args.set


def main(argv: list[str] | None = None, prog: str = "python -m cluster") -> int:
    args = parse(argv, prog)
    logs.configure(args.log_level, args.quiet)
    from analysis.report import feature_table
    from cluster.config import load_config
    from cluster.run import execute

    try:
        config = load_config(args.config, overrides(args))
        result = execute(config, resume=args.resume, quiet=args.quiet, executor=args.executor)
    except UserError as err:
        return report(err)
    except KeyboardInterrupt:
        print("interrupted: the micro-batches committed so far are kept; rerun with --resume to finish.",
              file=sys.stderr)
        return 130
    record = result["record"]
    print(feature_table(result["summary"]["outlier_features"]))
    timings = ", ".join(f"{k} {v:.1f}" for k, v in record.timings.items())
    print(f"\n{record.tokens} tokens x {record.num_layers} layers; timings (s): {timings}")
    print(f"run: {record.output}  (report.html, report.md and the analysis beside the run record)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
