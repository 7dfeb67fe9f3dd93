"""Training and evaluation: ``mita train`` (``mita.train.cli``); :func:`mita.train.evaluate.evaluate`
(the ``mita eval`` command is :mod:`mita.analysis.eval_cli`).

Submodules import lazily so that ``import mita`` stays light; optional dependencies (safetensors) are
imported only where checkpoints are read or written.
"""
