"""Models on the Hugging Face Hub: `org/name` (or `org/name@revision`) resolved to a folder of the local Hub
cache, the one resolver every loader of a model directory goes through.

The rule: an existing local directory wins; otherwise a string shaped like a repo id is fetched with
huggingface_hub's snapshot_download (with HF_HUB_OFFLINE=1 from the cache alone); anything else is handed
back as given, for the caller's own "does not exist" message. Only data files are fetched (MODEL_FILES:
safetensors, YAML, JSON, text): nothing that is unpickled or run, whatever else the repository holds.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ArtifactError
from .ready_made import ready_made_dir

# owner/name as the Hub spells them (no "--", no leading "." or "-"), optionally @branch, tag or commit
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?")
SNAPSHOT = re.compile(r"models--(?P<owner>.+?)--(?P<name>.+)/snapshots/(?P<commit>[0-9a-f]{40})")
MODEL_FILES = ["*.safetensors", "*.yaml", "*.json", "*.txt"]  # what a model directory holds (never *.pt, *.bin)
TRUE = ("1", "on", "yes", "true", "y")


class HubError(ArtifactError):
    """A Hub model that cannot be had here: not cached while offline, unknown, or a revision it lacks."""


def parse_repo_id(source: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of a string shaped like `org/name[@revision]`; None for anything else."""
    match = REPO_ID.fullmatch(str(source))
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def hub_reference(source: str | Path, revision: str | None = None) -> tuple[str, str | None] | None:
    """(repo id, revision) when `source` names a Hub model, None when it is a local directory (which wins)
    or not shaped like a repo id. A revision given both ways must agree."""
    if Path(source).is_dir():
        return None
    parsed = parse_repo_id(source)
    if parsed is None:
        return None
    repo, pinned = parsed
    if pinned and revision and pinned != revision:
        raise HubError(f"{source} pins revision {pinned!r} but revision={revision!r} was also given: give one")
    return repo, pinned or revision


def hub_cache_dir() -> Path:
    """The Hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (read at each call, as
    the environment may change after huggingface_hub was imported)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE or constants.HF_HUB_OFFLINE


def download_model(repo: str, revision: str | None = None, source: str | None = None) -> Path:
    """The snapshot folder of Hub model `repo` (downloading MODEL_FILES unless offline); HubError naming the
    id, the cache and the fix when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    name = repo + (f"@{revision}" if revision else "")
    asked = f"{source} is not a local directory, and the Hub model {name}" if source else f"the Hub model {name}"
    cache, offline = hub_cache_dir(), hub_offline()
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline,
                                   allow_patterns=MODEL_FILES)
    except RevisionNotFoundError:
        raise HubError(f"{asked} has no revision {revision!r}: give a branch, tag or commit it has") from None
    except RepositoryNotFoundError:
        raise HubError(f"{asked} does not exist on the Hub, or is private or gated for this account: check the id, "
                       f"or log in (`hf auth login`)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1: nothing is downloaded" if offline else "the Hub could not be reached"
        raise HubError(f"{asked} is not in the local Hub cache {cache} ({why}; the cache is $HF_HUB_CACHE, else "
                       f"$HF_HOME/hub). Fetch it where there is a network, into that cache: `hf download {repo}"
                       + (f" --revision {revision}" if revision else "") + "` (older huggingface_hub: "
                       f"`huggingface-cli download {repo}`), or pass a local copy of the model directory") from None
    except HfHubHTTPError as err:  # e.g. 401: a token that may not read it
        raise HubError(f"{asked} could not be fetched ({err}): check the id and the token (`hf auth login`)") from None
    return Path(folder)


def model_source_exists(source: str | Path) -> bool:
    """Whether `source` can name a model here: a local directory, a ready-made model's name, or a Hub id (which
    resolve_model_dir fetches or finds in the Hub cache)."""
    return Path(source).is_dir() or ready_made_dir(source) is not None or hub_reference(source) is not None


def resolve_model_dir(source: str | Path, revision: str | None = None) -> Path:
    """A model directory: `source` itself when it is a local directory, a ready-made model's folder for its short
    name (simvq_common.ready_made), else its Hub snapshot."""
    ready = ready_made_dir(source)
    if ready is not None:
        return ready
    reference = hub_reference(source, revision)
    if reference is None:
        if revision:
            raise HubError(f"revision={revision!r} needs a Hub id (org/name), but {source} is a local path")
        return Path(source)
    return download_model(*reference, source=str(source))


def cached_repo_of(directory: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) of a folder of the local Hub cache (a snapshot), None for any other directory."""
    match = SNAPSHOT.search(Path(directory).resolve().as_posix())
    if match is None or "/" in match["owner"] or "/" in match["name"]:
        return None
    return f"{match['owner']}/{match['name']}", match["commit"]


def pinned_hub_id(directory: str | Path) -> str | None:
    """`org/name@commit` for a snapshot of the Hub cache (what to record to find exactly it again), else None."""
    found = cached_repo_of(directory)
    return None if found is None else f"{found[0]}@{found[1]}"


def model_location(source: str | Path) -> str:
    """What to record for a model so that it is found again: a snapshot of the Hub cache as `org/name@commit`,
    any other local directory as its absolute path, a Hub id as given (its fingerprint, recorded beside, pins it)."""
    if Path(source).is_dir():
        return pinned_hub_id(source) or str(Path(source).resolve())
    return str(source)
