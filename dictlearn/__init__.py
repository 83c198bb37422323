"""dictlearn."""
