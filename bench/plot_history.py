"""Plots the per-epoch quality curves of a training run (its history.json) to a PNG.

    python bench/plot_history.py models/dcgan-consolidation/history.json curves.png
"""

from __future__ import annotations

import json
import sys

from sonogen.gate_report import plot_curves

if __name__ == "__main__":
    history_path, out = sys.argv[1:3]
    plot_curves(json.loads(open(history_path).read()), out)
