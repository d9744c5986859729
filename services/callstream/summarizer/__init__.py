"""The summarizer service: structured summaries from an LLM engine over the TensorRT-LLM gRPC protocol."""
