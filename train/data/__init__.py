"""Dataset reading: labels to pixel masks, grouped splits, decoded/resized caches."""
