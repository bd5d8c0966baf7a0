"""Records: the append-only store of cells, runs, checks and stability units, the checkpoint
layout, and the one reduction of them (selection, pooling, means, intervals) reports use."""

from bench.records.load import load_checks, load_correct, load_records, load_runs, load_stability
from bench.records.store import RecordStore

__all__ = ["RecordStore", "load_checks", "load_correct", "load_records", "load_runs", "load_stability"]
