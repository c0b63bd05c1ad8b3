from kiln.runtime.executor import Executor, IterationStats
from kiln.runtime.request import Request, Response, Result

__all__ = ["Executor", "IterationStats", "Request", "Response", "Result"]
