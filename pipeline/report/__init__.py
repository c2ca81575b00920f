"""Markdown reports rendered from per-item scores, significance.json and costs.json (jinja2 templates)."""
