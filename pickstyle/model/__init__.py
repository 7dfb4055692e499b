"""Model: backbone components, context-style adapters, guidance, the CS-CFG pipeline, the step cache."""
