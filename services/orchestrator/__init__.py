"""The orchestrator: public Generate API, tokenizer, DSI/SI/non-SI scheduling over a pool of targets."""
