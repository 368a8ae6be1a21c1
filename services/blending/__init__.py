"""The blending service: weighted targets from per-source features (numpy only)."""
