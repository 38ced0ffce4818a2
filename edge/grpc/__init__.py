"""The edge agent's gRPC transport: the Open Inference Protocol's ``GRPCInferenceService``.

``grpc_predict_v2.proto`` is the protocol's own definition (plus Triton's model-repository
RPCs); ``grpc_predict_v2_pb2*`` are generated from it by ``make proto``; ``service.py`` is
the thin transport over the data plane, and ``server.py`` starts it in each worker.
"""
