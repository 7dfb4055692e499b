"""Data: pair sources, procedural styles, camera motion, WebDataset shards, video I/O."""
