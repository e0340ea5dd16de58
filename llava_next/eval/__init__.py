"""Evaluation: teacher-forced scoring of candidate answers (score.py) and benchmark tasks run from a YAML file
into resumable per-sample JSONL and a summary (tasks.py, answers.py, run.py, records.py)."""

from .score import CandidateScore, ItemScore, ScoreError, ScoreItem, score

__all__ = ["CandidateScore", "ItemScore", "ScoreError", "ScoreItem", "score"]
