"""CT-only inference: sliding-window patch predictions over subchondral ROIs, parameter maps, ROI tables."""
