"""fsku: a financial-security QA toolkit (knowledge base, retrieval, distillation, evaluation)
built as an MLflow project. See README.md for the pipeline."""

__version__ = "0.1.0"
