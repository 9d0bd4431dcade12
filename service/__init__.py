"""genserve at serve time: the runtime over exported artifacts, the served model set, the
verbs, HTTP (BentoML) and gRPC, access control, overload, metrics and settings. No torch."""

__all__: list[str] = []
