"""Stage 6, fixed-length windows: their order (`permutation`), packing (`packing`) and data epochs (`epochs`)."""
