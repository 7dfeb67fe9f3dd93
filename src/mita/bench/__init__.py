"""``mita bench``: time and peak memory of MiTA backends against ``F.scaled_dot_product_attention``.

Every configuration is measured in the same run as SDPA and reported as a speed-up ratio. On CPU each
measurement runs in a fresh subprocess so that its peak-memory rise (max RSS) is its own.
"""

from .cli import main

__all__ = ["main"]
