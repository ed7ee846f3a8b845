"""Analyses of grown models.

``surgeon analyze``: :mod:`surgeon.analyze.units` computes what the old and new units of a grown
network do (accuracies with one unit group zeroed, linear probes, γ and activation statistics,
embeddings, maximally activating images); :mod:`surgeon.analyze.report` writes the PNG figures,
``index.html`` and ``metrics.json``. Nothing is imported here, so each sub-module pays only for
its own dependencies.
"""
