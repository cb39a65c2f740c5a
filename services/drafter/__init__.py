"""The drafter service: loads a small LM and streams draft tokens (``Draft``)."""
