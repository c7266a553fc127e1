"""infllm_lite: long-context inference with InfLLM context memory."""
