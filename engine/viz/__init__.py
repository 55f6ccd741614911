"""Figures and exports: style (colours, axes), score charts, trade-off charts, the HTML report."""
