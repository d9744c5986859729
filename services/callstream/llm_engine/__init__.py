"""The CPU LLM engine: continuous batching over llama.cpp, serving the TensorRT-LLM gRPC protocol."""
