"""Inference: question classification/parsing now; LLM backends, answering and the orchestrator
arrive with issue 3."""
