"""The HTTP side: the ops dashboard's files and the four services over Connect for
browsers (`http_server` runs it next to the grpc.aio server)."""
