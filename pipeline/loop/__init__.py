"""The loop: what to label next (select), labels in and out of labelling tools (labelling), and the one command that
improves a registered model (improve)."""
