"""Generated protobuf and gRPC code for lora_gateway.v1."""
