"""The command's exit codes: one per error class of `lora_gateway.errors`."""

from __future__ import annotations

from lora_gateway import errors

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CODES: dict[type[errors.GatewayError], int] = {
    errors.InvalidArgument: 3,
    errors.NotFound: 4,
    errors.Unauthenticated: 5,
    errors.PermissionDenied: 6,
    errors.ResourceExhausted: 7,
    errors.FailedPrecondition: 8,
    errors.Unavailable: 9,
    errors.DataLoss: 10,
    errors.DeadlineExceeded: 11,
    errors.Aborted: 12,
}


def exit_code(exc: errors.GatewayError) -> int:
    for cls in type(exc).__mro__:
        code = EXIT_CODES.get(cls)
        if code is not None:
            return code
    return EXIT_FAILURE
