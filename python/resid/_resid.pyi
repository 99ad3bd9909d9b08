"""The compiled extension (internal: use the names re-exported by `resid`)."""
from typing import Any

def __getattr__(name: str) -> Any: ...
