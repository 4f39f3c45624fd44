"""``mpff.report.main``: kept for :func:`mpff.train._write_report` (and the test that stands in
for it), which import the report from here. The report is :mod:`mpff.analysis.report`."""

from .analysis.report import main

__all__ = ["main"]
