"""Query the served session model: raw sessions so far in, top-k next item ids and scores out."""
from __future__ import annotations

from pipeline_lib.serving.client import RecsysClient


class SessionClient(RecsysClient):
    """``RecsysClient`` for the session model: every raw column is a list (one session per row),
    sent as ``__values``/``__offsets``; :meth:`RecsysClient.recommend` answers ``item_ids`` and
    ``scores``, ``[sessions, k]``."""

    def to_arrays(self, rows, partial: bool = False):
        """The session lists the rows carry (a session version with a feature snapshot looks the item feature lists
        a request leaves out up by item id; a required list left out is named by the server: invalid-argument)."""
        return super().to_arrays(rows, partial=True)
