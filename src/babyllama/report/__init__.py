"""`babyllama report`: what a training run did, as one Markdown file and a self-contained HTML copy.

    write_report(ReportConfig(runs=["runs/pretrain"]))          # RUN/report.md, RUN/report.html
    write_report(["runs/a", "runs/b"], out="runs/compare")       # one side-by-side comparison

A run's report holds its resolved configuration, dataset and tokenizer manifests, parameter count,
loss and learning-rate curves, throughput and MFU, every evaluation in RUN/eval/, sample
generations, the environment and the time it took. Several runs give one comparison: curves
overlaid, a table of final figures, each run's evaluation headlines, the settings that differ.

collect.py reads a run directory into a plain dict (files only: no torch), plots.py draws the
PNGs, evals.py and render.py turn it into blocks, document.py writes the blocks as Markdown and
HTML, writer.py decides where they go and never replaces a file it did not write.
"""

from babyllama.report.collect import collect_run
from babyllama.report.document import Section
from babyllama.report.writer import ReportConfig, write_report

__all__ = ["ReportConfig", "Section", "collect_run", "write_report"]
