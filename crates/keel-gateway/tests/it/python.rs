//! The official `openai` Python package as a real client (see `python/client.py`).
