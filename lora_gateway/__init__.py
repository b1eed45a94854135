"""lora-gateway: multi-tenant LoRA serving (gRPC in front of an in-process vLLM engine)."""

__version__ = "0.1.0"
