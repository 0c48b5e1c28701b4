"""gRPC translation layer: one servicer per service, plus the interceptors.

Servicers validate, translate protobuf to domain objects and back, and raise
`sira_server.errors` exceptions; `interceptors.ErrorInterceptor` maps those to
statuses and `interceptors.AuthInterceptor` decides who may call what (see
`interceptors.build_interceptors` for their order). The caller of the current
RPC is `context.current_principal()`.
"""
