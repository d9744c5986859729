"""Quality evaluations that need models: `callstream eval ...` (the summarizer's fact coverage and faithfulness)."""
