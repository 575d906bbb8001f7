"""A top-k version made to answer user-id requests: its config.pbtxt takes every request column but the user id as
optional (the served model looks the missing ones up, :class:`pipeline_lib.features.lookup.UserLookup`) and answers
``cold_start`` [rows] (BOOL) beside ``item_ids``, ``scores`` and ``count``."""
from __future__ import annotations

from pathlib import Path

from pipeline_lib.features.lookup import COLD_START_OUTPUT


def allow_user_id_requests(config_path: Path, user_id: str, required: tuple[str, ...] = ()) -> None:
    """Rewrite a top-k (or ranking) version's ``config.pbtxt``: inputs other than ``user_id`` and ``required``
    (a ranking version: the item id) optional, ``cold_start`` out."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    cfg = text_format.Parse(Path(config_path).read_text(), mc.ModelConfig())
    for inp in cfg.input:
        if inp.name != user_id and inp.name not in required:
            inp.optional = True
    if not any(o.name == COLD_START_OUTPUT for o in cfg.output):
        cfg.output.append(mc.ModelOutput(name=COLD_START_OUTPUT, data_type=mc.TYPE_BOOL, dims=[-1]))
    Path(config_path).write_text(text_format.MessageToString(cfg))
