"""Evaluation reports: Markdown tables and PNG figures built from the stages' artifacts."""
