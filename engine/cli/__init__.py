"""Headless CLI: ``python -m engine <command>``, writing to the store the dashboard reads.

Commands: ``score``, ``evaluate``, ``slice``, ``quantize``, ``sweep-slicing``,
``sweep-quantization``, ``sensitivity``, ``drop``, ``stack``, ``sweep-methods``, ``optimize-bits``,
``optimize-slicing``, ``export``.  Bad arguments or inputs print one clear line and exit
with status 2.  For multi-GPU servers, ``--device-map auto``
spreads the model over the GPUs with accelerate.

:mod:`engine.cli.parser` holds the arguments, :mod:`engine.cli.commands` what each command does.
"""

from engine.cli.commands import PLANS, main, run
from engine.cli.parser import build_parser

__all__ = ["PLANS", "build_parser", "main", "run"]
