"""scaling_laws."""
