"""Pretrained weight files fetched once into torch hub's cache, checked against the sha256 prefix in their name."""
from __future__ import annotations

import os
import re
import socket
import threading
import urllib.request
from pathlib import Path

import torch

# Per socket operation: torch.hub's urlopen sets none, so offline a download would hang instead of failing.
DOWNLOAD_TIMEOUT_S = 20.0


def hub_cache_path(url: str) -> Path:
    """Where torch hub keeps the file of `url` once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def name_hash_prefix(path: str | Path) -> str | None:
    """The sha256 prefix torch hub's naming convention (name-<prefix>.ext) puts in a file name, if any."""
    match = re.search(r"-([0-9a-f]{8,})\.\w+$", Path(path).name)
    return match.group(1) if match else None


def download_checked(url: str, path: Path) -> None:
    """Download `url` to `path`, refused unless its sha256 starts with the prefix in the file name."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=name_hash_prefix(path), progress=False)
    finally:
        socket.setdefaulttimeout(old_timeout)


def url_reachable(url: str, timeout: float) -> bool:
    """One HEAD request (proxies from the environment honoured), bounded by `timeout` even if DNS hangs."""
    result = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                result.append(r.status < 400)
        except Exception:  # noqa: BLE001 - any failure means "not reachable now"
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])
