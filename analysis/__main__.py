"""Re-analyse a finished run without re-extracting: `python -m analysis RUN [flags]`.

`python -m analysis compare RUN1 RUN2 ...` tabulates and plots several runs (analysis.compare);
`python -m analysis explain RUN --dim D` says all the run knows of one dim (analysis.explain).

Criteria default to the run config's `analysis:` section (the run record); flags override them.
Prints the outlier feature table and writes the outputs into RUN (analysis.report).
Exit codes: 0 done, 2 the run or the flags cannot be used (one line on stderr says why),
1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from analysis.report import feature_table
from analysis.settings import run_criteria
from analysis.steps import analyse
from analysis.settings import LAYER_UNITS
from common import logs
from common.errors import UserError, report
from common.layout import RunLayout
from common.record import read_record


def parse(argv: list[str] | None, prog: str = "python -m analysis") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (local path or URI such as s3://bucket/run)")
    parser.add_argument("--threshold", type=float, help="magnitude |x| >= T counts as outlier")
    parser.add_argument("--min-layer-fraction", type=float, help="least share of layers")
    parser.add_argument("--min-token-fraction", type=float, help="least share of tokens")
    parser.add_argument("--layer-unit", choices=LAYER_UNITS, help="count layers or layer-sites")
    parser.add_argument(
        "--allow-partial", action="store_true", help="skip unreadable files with a warning"
    )
    logs.add_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m analysis") -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # `python -m analysis compare RUN1 RUN2 ...`
        from analysis.compare import main as compare

        return compare(argv[1:])
    if argv[:1] == ["explain"]:  # `python -m analysis explain RUN --dim D`
        from analysis.explain import main as explain

        return explain(argv[1:])
    args = parse(argv, prog)
    logs.configure(args.log_level, args.quiet)
    try:
        criteria = run_criteria(read_record(RunLayout.of(args.run)))
        flags = {
            "threshold": args.threshold,
            "min_layer_fraction": args.min_layer_fraction,
            "min_token_fraction": args.min_token_fraction,
            "layer_unit": args.layer_unit,
        }
        given = {k: v for k, v in flags.items() if v is not None}
        criteria = dataclasses.replace(criteria, **given)
        summary = analyse(args.run, criteria, allow_partial=args.allow_partial)
    except UserError as err:
        return report(err)
    features = summary["outlier_features"]
    print(f"{len(features)} outlier features in {args.run} ({summary['seconds']['total']:.1f} s)")
    print(feature_table(features))
    return 0


if __name__ == "__main__":
    sys.exit(main())
