"""The runtime: paged KV cache, continuous-batching scheduler, sampler and the LLM API."""
from .llm import LLM
from .request import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
