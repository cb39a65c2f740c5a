"""The DSI services: target, drafter, orchestrator, and the model and server code they share."""
