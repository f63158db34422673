"""ScaiBunker's stream."""
