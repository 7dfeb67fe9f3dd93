"""Training and evaluation: ``mita train`` (``mita.train.cli``), ``mita eval`` (``mita.train.evaluate``).

Submodules import lazily so that ``import mita`` stays light; optional dependencies (safetensors) are
imported only where checkpoints are read or written.
"""
