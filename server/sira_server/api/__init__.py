"""gRPC translation layer: one servicer per service, plus the guards.

Servicers validate, translate protobuf to domain objects and back, and raise
`sira_server.errors` exceptions; `guards.ErrorGuard` maps those to statuses and
`guards.AuthGuard` decides who may call what, both applied at registration by
`guards.GuardedRegistrar` (see its module for their order). The caller of the current
RPC is `context.current_principal()`.
"""
