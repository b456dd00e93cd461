"""The kubelet plugin: gRPC servers, prepare/unprepare state, life cycle."""
