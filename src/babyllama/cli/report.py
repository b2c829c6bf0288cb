"""Reporting on runs: `babyllama report RUN [RUN ...]`, a run's report or a comparison of several."""

from __future__ import annotations

import argparse

from babyllama.cli.flags import Default


def _report_config():
    from babyllama.report import ReportConfig

    return ReportConfig


def cmd_report(args) -> None:
    from babyllama.report import ReportConfig, write_report

    written = write_report(ReportConfig(runs=args.runs, out=args.out, title=args.title, samples=args.samples))
    print(f"report: {written['markdown']}")
    print(f"html:   {written['html']}")
    for png in written["images"]:
        print(f"plot:   {png}")


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="a run's report (Markdown + self-contained HTML), or a comparison of runs",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="One run: RUN/report.md, RUN/report.html (plots embedded: open it anywhere) and "
                                   "RUN/report/*.png,\nwith the resolved config, data and tokenizer manifests, "
                                   "parameters, loss and learning-rate\ncurves, throughput and MFU, every "
                                   "evaluation in RUN/eval/, sample generations, the environment\nand the time "
                                   "taken. Several runs: one comparison (curves overlaid, final figures side by "
                                   "side,\nthe settings that differ) in --out, by default the directory of the "
                                   "first run.\nOnly files the report wrote are ever replaced.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --out of pretrain or sft)")
    p.add_argument("--out", help="directory for report.md, report.html and report/ (default: the run itself; for "
                                 "several runs, the directory holding the first)")
    p.add_argument("--title", help="the report's title (default: from the run names)")
    p.add_argument("--samples", type=int, default=Default(_report_config, "samples"),
                   help="generations shown per generation evaluation (default %(default)s)")
    p.set_defaults(func=cmd_report)
