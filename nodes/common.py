"""What every node of the pack shares."""

CATEGORY = "sampling/syncdiffusion"
