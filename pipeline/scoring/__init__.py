"""Scoring of parsed predictions: SQuAD v2 EM/F1, abstention, false answers, unsupported answers."""
