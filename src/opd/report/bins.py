"""Response-position bins as token ranges, shared by every report that shows metrics by position.

A bin number means nothing to a reader ("bin 2" of what?), and plotting bare indices let matplotlib
label the axis 0.0, 0.5, 1.0. The ranges must match how ``opd.diagnostics`` assigns tokens, so they
are computed in one place.
"""

from __future__ import annotations

__all__ = ["bin_labels", "bin_ranges"]


def bin_ranges(n_bins: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """Inclusive response-token ranges of the position bins, as the trainer assigns them.

    ``opd.diagnostics`` puts token t in bin ``t * n_bins // max_new_tokens`` (clamped to the last), so
    bin i holds t in [ceil(i*L/B), ceil((i+1)*L/B) - 1].
    """
    if n_bins < 1 or max_new_tokens < 1:
        return []
    out = []
    for i in range(n_bins):
        lo = -(-i * max_new_tokens // n_bins)
        hi = -(-(i + 1) * max_new_tokens // n_bins) - 1
        out.append((lo, max(lo, hi)))
    return out


def bin_labels(n_bins: int, max_new_tokens: int | None) -> list[str]:
    """ "0-63", "64-127", ... or, without a known token budget, "bin 0", "bin 1", ..."""
    if isinstance(max_new_tokens, int) and max_new_tokens > 0:
        return [f"{lo}-{hi}" for lo, hi in bin_ranges(n_bins, max_new_tokens)]
    return [f"bin {i}" for i in range(n_bins)]
