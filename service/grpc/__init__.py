"""The Open Inference Protocol v2 (KServe v2) over gRPC: the .proto, its generated stubs
(``grpc_predict_v2_pb2``, ``grpc_predict_v2_pb2_grpc``; committed, regenerated with the
command in docs/GRPC.md), the tensor conversion (``convert``) and the server (``server``)."""
