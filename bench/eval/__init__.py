"""Evaluation: defenses behind one [0, 1] interface, the cell engine, the checkpoint checks
and gates, the stability measurements."""
