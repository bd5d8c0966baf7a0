"""Records: the append-only store of cells, runs, checks and stability units, the checkpoint
layout, and the one reduction of them (selection, pooling, means, intervals) reports use."""
