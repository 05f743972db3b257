"""Human-feedback labelling app (``rlhfkit label``, extra ``app``): FastAPI + SQLAlchemy server, assignment
with overlap and gold items, agreement statistics, and export to preference / SFT JSONL."""
