"""The serving core: what both the edge agent and the cloud worker run models with.

Model configs, the repository and its version policies, the runtimes (ONNX Runtime,
TensorRT, llama.cpp, embeddings), pre- and post-processing pipelines, the data plane and
its metrics. It imports ``shared`` and the engines, never a transport (Flask, gRPC, paho),
``edge`` or ``cloud`` (checked by the import contract in ``make lint``).
"""
