"""Inference: question classification and parsing, prompts, multiple-choice scoring, answering,
the resumable orchestrator and predict (test.csv -> submission.csv)."""
