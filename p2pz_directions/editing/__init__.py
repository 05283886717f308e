"""Editing: the editor registry (`editors`), plugin discovery (pluggy hookspecs), images, model loading and the offline demo model."""
