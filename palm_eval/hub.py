"""Files from the Hugging Face hub: the local cache first, a download only when the hub answers.

huggingface_hub retries an unreachable hub for about 25 s before giving up; a one-connection probe first makes
an offline machine fail at once, so the caller can say which file to place where.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from palm_eval.errors import PalmEvalError


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def hub_file(repo_id: str, filename: str) -> str:
    """Local path of repo_id/filename: from the Hugging Face cache, else downloaded.

    Raises PalmEvalError (with the reason only; the caller adds what to do) when neither works.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    if not hub_reachable():
        raise PalmEvalError("the Hugging Face hub is unreachable and the file is not in its cache")
    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:
        raise PalmEvalError(f"the Hugging Face hub did not give the file ({type(e).__name__})") from None
