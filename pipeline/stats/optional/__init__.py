"""Optional per-trial analyses (power, cost-effectiveness, unsupported sensitivity, mixed models); see analyses.py."""
