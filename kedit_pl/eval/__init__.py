"""Evaluation: pure metrics, scoring, the pre-score cache, metric groups, the lifelong protocol, callbacks and
reports."""
