"""Training and evaluation engine (classification now; segmentation and detection plug in later)."""
