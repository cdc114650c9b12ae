"""`vramkit bench`: kernels measured against torch in the same run (ratios, never absolute targets)."""
