"""`python -m lora_gateway.cli`: the `lora-gateway` command."""

from lora_gateway.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
