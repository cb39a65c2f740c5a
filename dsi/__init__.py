"""DSI: Distributed Speculative Inference (Timor et al., ICLR 2025) as gRPC microservices."""

__version__ = "0.1.0"
