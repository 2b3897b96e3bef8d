"""Research tooling around the bundle: the transfer study and the lesion-visibility analysis.

Run from the repository root after ``source tools/env.sh``, which puts ``bundle/`` on ``PYTHONPATH`` so the bundle's
``scripts`` package imports, e.g. ``python -m experiments.transfer_study --budget smoke``.
"""
