"""The reference host: a small workflow engine that runs cases on the memory plugin.

It shows engine authors how to embed knhk-memory (see docs/engine-guide.md)
and is what ``knhk-memory demo`` runs. It is an example, not the product:
:class:`Engine` runs structured workflows built from the control-flow
patterns WCP 1-10 and 13 over batches of cases held in numpy arrays.
"""

from __future__ import annotations

from .engine import Engine, HostPlugin, RunTally
from .executors import CASE_END, CASE_START, TASK
from .reference import run_case
from .workflows import SUPPORTED_PATTERNS, Block, Workflow, generate_definitions, parse_workflow

__all__ = ["Engine", "HostPlugin", "RunTally", "Workflow", "Block", "parse_workflow", "generate_definitions",
           "run_case", "SUPPORTED_PATTERNS", "TASK", "CASE_START", "CASE_END"]
