"""Layer application: tar reading, in-root path resolution, the privilege seam, and the applier."""
