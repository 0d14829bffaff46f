"""Results: run folders (config, Parquet metrics, summary) and reports comparing runs."""

from raymed.results.report import plot_runs, report, summary_table
from raymed.results.runs import read_run
from raymed.results.store import RunWriter

__all__ = ["RunWriter", "plot_runs", "read_run", "report", "summary_table"]
