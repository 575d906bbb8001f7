"""What a person reads at the end of a run: rounded figures, the CLI's closing summary, the
markdown of the Prefect artifacts, and ready-to-paste commands to query the served model.

Plain functions over the run's summary dict (see ``flows/pipeline.py``); no Prefect here. The
flows call them and turn the strings into artifacts; ``recsys run`` prints :func:`cli_summary`.
"""
from __future__ import annotations

import base64
import json
import math
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import pandas as pd

SIG = 4  # significant digits of every figure shown to a person (summary.json keeps full precision)


# -- numbers ----------------------------------------------------------------------------------------


def round_sig(v: Any, digits: int = SIG) -> Any:
    """A float rounded to ``digits`` significant digits; anything else unchanged."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (float, np.floating)):
        return v
    v = float(v)
    if not math.isfinite(v) or v == 0:
        return v
    return round(v, digits - 1 - int(math.floor(math.log10(abs(v)))))


def num(v: Any, digits: int = SIG) -> str:
    """``0.7512``, ``0.03125``, ``5.123``, ``4759``, ``n/a`` for NaN, ``-`` for None."""
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "n/a"
        return f"{float(v):.{digits}g}"
    return str(v)


def rounded(obj: Any, digits: int = SIG) -> Any:
    """``obj`` (dicts, lists, floats) with every float rounded to ``digits`` significant digits."""
    if isinstance(obj, Mapping):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return round_sig(obj, digits)


# -- tables -----------------------------------------------------------------------------------------


def metric_rows(metrics: Mapping[str, Any]) -> list[dict]:
    """The ``metrics`` table artifact: one row per scalar metric, figures rounded."""
    return [{"metric": k, "value": num(v)} for k, v in metrics.items() if not isinstance(v, (dict, list))]


def _cell(v: Any, max_items: int, tail: bool = False) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        items = [num(x, 3) if isinstance(x, (float, np.floating)) else num(x) for x in list(v)]
        more = len(items) - max_items
        if more <= 0:
            return "[" + ", ".join(items) + "]"
        if tail:  # the end of a sequence (a session so far) is what matters
            return f"[+{more} …, " + ", ".join(items[-max_items:]) + "]"
        return "[" + ", ".join(items[:max_items]) + f", … +{more}]"
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    return num(v)


# served over HTTP, over gRPC and computed offline: one column when they agree
SCORE_COLUMNS = ("served_http", "served_grpc", "offline")


def compact_table(df: pd.DataFrame, max_items: int = 4, max_rows: Optional[int] = None,
                  merge: Optional[tuple[str, tuple[str, ...]]] = None, tail: Iterable[str] = ()) -> list[dict]:
    """Records of strings that fit a UI pane: floats to 4 significant digits, long lists cut to
    their first ``max_items`` (``[3, 8, 19, 4, … +6]``; the last ones for ``tail`` columns).
    ``merge=(name, columns)`` folds ``columns`` into one column ``name``: one value where they all
    read the same, else ``a / b / c``."""
    df = df if max_rows is None else df.head(max_rows)
    tail = set(tail)
    rows = []
    for row in df.to_dict(orient="records"):
        out = {str(c): _cell(v, max_items, c in tail) for c, v in row.items()}
        if merge is not None and all(c in out for c in merge[1]):
            values = [out.pop(c) for c in merge[1]]
            out[merge[0]] = values[0] if len(set(values)) == 1 else " / ".join(values)
        rows.append(out)
    return rows


# -- markdown artifacts -----------------------------------------------------------------------------


def config_markdown(config: Mapping[str, Any], path: Optional[Path] = None) -> str:
    """The effective (validated, defaults filled in) config as YAML; the admin key is redacted."""
    import yaml

    cfg = json.loads(json.dumps(config, default=str))
    if (cfg.get("serving") or {}).get("admin_api_key"):
        cfg["serving"]["admin_api_key"] = "***"
    text = yaml.safe_dump(cfg, sort_keys=False)
    where = f"\n\nSaved with the run as `{path}`." if path else ""
    return f"# effective config\n\nThe config this run used, after defaults and overrides.{where}\n\n```yaml\n{text}```\n"


def image_markdown(png: Path, title: str, caption: str = "") -> str:
    """A PNG embedded as a data URI (the Prefect UI renders it; no file server needed)."""
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{data})" + (f"\n\n{caption}" if caption else "")


def learning_curve_markdown(pngs: Iterable[tuple[str, Path]]) -> str:
    parts = ["# learning curve", ""]
    for title, png in pngs:
        if Path(png).exists():
            parts += [f"## {title}", "", image_markdown(png, f"{title} learning curve", f"`{png}`"), ""]
    return "\n".join(parts)


# -- how to query the served model ------------------------------------------------------------------

# what `recsys serve` / `recsys predict` need of the run's overrides (not the training settings)
_SERVE_KEYS = ("export.model_repository", "export.model_name", "serving.host", "serving.http_port",
               "serving.grpc_port", "serving.metrics_port", "serving.model_control", "serving.repository_poll_secs",
               "serving.instance_count", "runs_dir", "task", "session.columns.")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cli_args(config_path: Optional[str], overrides: Optional[Mapping[str, Any]]) -> list[str]:
    """``--config``/``--set`` arguments that point `recsys serve`/`predict` at this run's model."""
    args = ["--config", str(config_path)] if config_path else []
    for key, value in _flatten(overrides or {}).items():
        if key.startswith(_SERVE_KEYS) and "admin_api_key" not in key:
            text = json.dumps(value) if not isinstance(value, str) else value
            args += ["--set", f"{key}={text}"]
    return args


_TRITON_TYPES = {"TYPE_STRING": "BYTES"}


def request_body(config_pbtxt: Path, row: Mapping[str, Any], only: Optional[list[str]] = None) -> dict:
    """The KServe v2 JSON body (Triton's HTTP API) for one raw row, typed from the served model's
    ``config.pbtxt``; list features go as ``<name>__values`` + ``<name>__offsets``. ``only``: just these
    inputs (a user-id request: the user id alone)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(Path(config_pbtxt).read_text(), model_config_pb2.ModelConfig(), allow_unknown_field=True)
    batched = cfg.max_batch_size > 0
    inputs = []
    for inp in cfg.input:
        dtype_name = model_config_pb2.DataType.Name(inp.data_type)
        datatype = _TRITON_TYPES.get(dtype_name, dtype_name.replace("TYPE_", ""))
        name = inp.name
        if only is not None and name.rsplit("__", 1)[0] not in only and name not in only:
            continue
        if inp.optional and row.get(name.rsplit("__", 1)[0] if name.endswith(("__values", "__offsets")) else name) is None:
            continue  # an optional input the row does not have (k, exclude_item_ids): left out
        if name.endswith(("__values", "__offsets")):
            base, part = name.rsplit("__", 1)
            items = list(_plain(row.get(base)) or [])
            data = items if part == "values" else [0, len(items)]
        else:
            data = [_plain(row.get(name))]
        data = [str(x) if datatype == "BYTES" else (float(x) if datatype.startswith("FP") else int(x)) for x in data]
        inputs.append({"name": name, "shape": [1, len(data)] if batched else [len(data)], "datatype": datatype,
                       "data": data})
    return {"inputs": inputs}


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v


def uv_command() -> str:
    """How to call uv here: ``uv`` when it is on PATH, else the copy `make` bootstrapped into the
    project's ``.tools/bin`` (a fresh machine), by its full path -- so the printed commands work as pasted."""
    import shutil

    if shutil.which("uv"):
        return "uv"
    local = Path(__file__).resolve().parents[1] / ".tools" / "bin" / "uv"
    return shlex.quote(str(local)) if local.exists() else "uv"


def query_commands(model_name: str, host: str, http_port: int, grpc_port: int, args: list[str],
                   request_file: Optional[Path] = None, body: Optional[dict] = None) -> dict:
    """Ready-to-paste commands: start Triton over the repository, query it with `recsys predict`
    (rows from the latest run) and with curl (one raw row of this run)."""
    extra = " ".join(shlex.quote(a) for a in args)
    extra = f" {extra}" if extra else ""
    url = f"{host}:{http_port}/v2/models/{model_name}/infer"
    uv = uv_command()
    out = {
        "model_name": model_name, "http": f"{host}:{http_port}", "grpc": f"{host}:{grpc_port}",
        "serve": f"{uv} run recsys serve{extra}",
        "predict": f"{uv} run recsys predict{extra} --protocol grpc",
        "metadata": f"curl -s {host}:{http_port}/v2/models/{model_name}",
    }
    head = f"curl -s {url} -H 'Content-Type: application/json'"
    if request_file is not None:
        out["curl"] = f"{head} -d @{shlex.quote(str(request_file))}"
    if body is not None:  # one input per line, as in docs/serving.md
        lines = ",\n    ".join(json.dumps(i, separators=(", ", ": ")) for i in body["inputs"])
        out["curl_inline"] = f"{head} -d " + shlex.quote('{"inputs": [\n    ' + lines + "\n]}")
    return out


# -- the run summary (CLI and Prefect) --------------------------------------------------------------


def _k_of(metrics: Mapping[str, Any]) -> Optional[str]:
    return next((k.split("@", 1)[1] for k in metrics if k.startswith("recall@")), None)


def baseline_interval_texts(intervals: Mapping[str, Mapping[str, Any]]) -> dict:
    """``{method: {metric: "0.812 [0.801, 0.823]"}}`` from a report's ``intervals`` (Interval JSON)."""
    out: dict = {}
    for method, per in (intervals or {}).items():
        out[method] = {m: interval_text(iv) for m, iv in per.items() if iv}
    return out


def interval_text(iv: Optional[Mapping[str, Any]], digits: int = SIG) -> str:
    """``0.812 [0.801, 0.823]`` from an Interval's JSON (``n/a`` parts where undefined)."""
    if not iv:
        return "-"
    def f(v: Any) -> str:
        return "n/a" if v is None else num(float(v), digits)
    return f"{f(iv.get('value'))} [{f(iv.get('lo'))}, {f(iv.get('hi'))}]"


def _figure(summary: Mapping[str, Any], key: str) -> str:
    """A headline figure with its interval when the summary has one."""
    return (summary.get("intervals") or {}).get(key) or num((summary.get("metrics") or {}).get(key))


def headline(summary: Mapping[str, Any]) -> str:
    """The model's test figures with their intervals (the baselines are in :func:`lift_line`; the
    validation figures in :func:`validation_line`)."""
    m = summary.get("metrics") or {}
    split = summary.get("metrics_split", "test")
    k = _k_of(m)
    if "auc" in m:  # ranking
        line = f"{split} auc {_figure(summary, 'auc')}, logloss {_figure(summary, 'logloss')}"
        n_eval = m.get("n_test", m.get("n_valid"))
        rows = f" ({m['n_train']:,} train / {n_eval:,} {split} rows)" if n_eval is not None and "n_train" in m else ""
        return line + rows
    if k is None:
        return ", ".join(f"{key} {num(v)}" for key, v in m.items())
    names = [n for n in ("recall", "ndcg", "mrr", "precision") if f"{n}@{k}" in m][:3]
    per_user = " per user" if "n_test_users" in m else ""
    line = f"{split}{per_user} " + ", ".join(f"{n}@{k} {_figure(summary, f'{n}@{k}')}" for n in names)
    if "ranker_auc" in m:
        line += f"; re-ranker auc {num(m['ranker_auc'])}"
    return line


def validation_line(summary: Mapping[str, Any]) -> Optional[str]:
    """The validation figures (what early stopping and tuning saw), labelled; None without any."""
    v = {k: x for k, x in (summary.get("validation_metrics") or {}).items() if isinstance(x, (float, np.floating))}
    if not v:
        return None
    return "validation (model choice only): " + ", ".join(f"{k} {num(x)}" for k, x in v.items())


def split_line(summary: Mapping[str, Any]) -> Optional[str]:
    """Sizes of train / validation / test."""
    sp = summary.get("split") or {}
    parts = []
    for name in ("train", "valid", "test"):
        d = sp.get(name)
        if isinstance(d, Mapping):
            unit = "sessions" if "sessions" in d else "rows"
            extra = f" ({d['positives']:,} positive)" if "positives" in d else ""
            parts.append(f"{d.get(unit, 0):,} {name if name != 'valid' else 'validation'} {unit}{extra}")
    return f"split ({sp.get('method', '?')}): " + ", ".join(parts) if parts else None


def lift_line(summary: Mapping[str, Any]) -> Optional[str]:
    """The model against the best baseline on the same split, in plain words (None if none ran)."""
    return f"baselines: {summary['lift']}" if summary.get("lift") else None


def tune_line(summary: Mapping[str, Any]) -> Optional[str]:
    """The tune stage's best trial (None when it did not run)."""
    t = summary.get("tune")
    if not t:
        return None
    params = ", ".join(f"{k}={num(v)}" for k, v in t["best_params"].items())
    return (f"tune: best of {t['n_trials']} trials is #{t['best_trial']}, validation {t['metric']} "
            f"{num(t['best_value'])} ({params}); trained with it")


def leaderboard_line(summary: Mapping[str, Any]) -> Optional[str]:
    """The candidates of the run on one line (None for a single-model run)."""
    rows = summary.get("leaderboard")
    if not rows:
        return None

    def cell(r: Mapping[str, Any]) -> str:
        if r.get("error"):
            return f"{r['candidate']} failed ({r['error'][:80]})"
        ci = f" [{num(r['ci_low'])}, {num(r['ci_high'])}]" if r.get("ci_low") is not None else ""
        return f"{r['candidate']} {num(r['value'])}{ci}" + (" (winner)" if r.get("winner") else "")

    return f"candidates, validation {rows[0]['metric']}: " + ", ".join(cell(r) for r in rows)


def gate_line(summary: Mapping[str, Any]) -> str:
    g = summary["gate"]
    outcome = g.get("outcome") or ("promoted" if g["promote"] else "refused")
    if g["promote"]:
        word = "promoted" if outcome == "promoted" else "INCONCLUSIVE, promoted"
        return f"gate (test split): {word}; {g['reason']}"
    word = "REFUSED" if outcome == "refused" else "INCONCLUSIVE, not promoted"
    return f"gate (test split): {word}: {g['reason']}"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def _where(path: str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def cli_summary(summary: Mapping[str, Any]) -> str:
    """The closing lines of `recsys run` (~8 lines)."""
    total = sum((summary.get("stage_seconds") or {}).values())
    q = summary.get("query") or {}
    name = q.get("model_name", "the model")
    lines = [f"{summary['model']}: {headline(summary)}",
             *filter(None, [leaderboard_line(summary), validation_line(summary), split_line(summary), tune_line(summary),
                            lift_line(summary)]),
             gate_line(summary)]
    lines += [f"warning: {w}" for w in summary.get("warnings") or []]
    if summary.get("model_version"):
        live = summary.get("live_server")
        lines.append(f"served: model '{name}' version {summary['served_version']}"
                     + (f" (previously {summary['previous_version']})" if summary.get("previous_version") else "")
                     + "; Triton answered like the offline model over HTTP and gRPC"
                     + (f"; the running server at {live} switched to it" if live else ""))
    elif summary.get("served_version"):
        lines.append(f"served: model '{name}' version {summary['served_version']} (unchanged)")
    lines.append(f"run folder: {_where(summary['run_dir'])}  ({_duration(total)}; summary.json, "
                 "model/learning_curve.png)")
    if q and summary.get("served_version"):
        running = bool(summary.get("live_server"))
        lines.append("query it:" if running else "serve and query it:")
        if not running:
            lines.append(f"  {q['serve']}    # Triton on HTTP {q['http']}, gRPC {q['grpc']}; Ctrl-C stops")
        out = "scores" if "auc" in (summary.get("metrics") or {}) else "top-k item ids"
        lines.append(f"  {q['predict']}    # from another shell: rows of the latest run in, {out} out")
        if q.get("curl"):
            lines.append(f"  {q['curl']}")
        if q.get("recommend"):
            lines.append(f"  {q['recommend']}    # by user id alone: features and history from the feature store")
        if q.get("curl_user"):
            lines.append(f"  {q['curl_user']}" + ("" if q.get("recommend") else
                                                  "    # by user id + item ids: features from the feature store"))
    return "\n".join(lines)


def run_summary_markdown(summary: Mapping[str, Any], title: str = "recsys pipeline run") -> str:
    """The ``run-summary`` artifact: what was trained, what serves now, how to query it."""
    q = summary.get("query") or {}
    name = q.get("model_name", "?")
    m = summary.get("metrics") or {}
    lines = [f"# {title}", "", f"**{summary['model']}**: {headline(summary)}", ""]
    lines += [f"- **warning**: {w}" for w in summary.get("warnings") or []]
    lines += [f"- {line}" for line in filter(None, [leaderboard_line(summary), validation_line(summary), split_line(summary),
                                                    tune_line(summary), lift_line(summary), gate_line(summary)])]
    if summary.get("model_version"):
        lines += [f"- serving: model **{name}** version **{summary['served_version']}** "
                  f"(previously {summary.get('previous_version') or 'none'}), published at `{summary['served_dir']}`",
                  f"- smoke test: Triton answered like the offline model over HTTP and gRPC "
                  f"(max \\|served - offline\\| = {summary['max_abs_diff_served_vs_offline']:.1e})"]
        if summary.get("live_server"):
            lines.append(f"- the running Triton at `{summary['live_server']}` switched to this version")
    elif summary.get("served_version"):
        lines.append(f"- serving: model **{name}** version **{summary['served_version']}** (unchanged)")
    lines.append(f"- run folder: `{summary['run_dir']}`")
    if q and summary.get("served_version"):
        lines += ["", "## query the served model", "",
                  f"Endpoints: HTTP `{q['http']}`, gRPC `{q['grpc']}` (model `{name}`).", "",
                  "```bash", f"{q['serve']}    # start Triton (Ctrl-C stops)" if not summary.get("live_server")
                  else "# a Triton server is already running", q["predict"], q["metadata"], "```"]
        if q.get("curl_inline"):
            lines += ["", "One raw row of this run over HTTP (KServe v2 JSON):", "", "```bash",
                      q["curl_inline"], "```"]
        if q.get("curl_user"):
            lines += ["", "By user id alone (the served model reads the user's features and recent items from the "
                      "feature store; `cold_start` says when it did not know the user):", "", "```bash",
                      *[c for c in (q.get("recommend"), q["curl_user"]) if c], "```"]
    split = summary.get("metrics_split", "test")
    lines += ["", f"## metrics ({split} split; [95% interval], bootstrap)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {split} {k} | {_figure(summary, k)} |" for k, v in m.items() if not isinstance(v, (dict, list))]
    lines += [f"| validation {k} | {num(v)} |" for k, v in (summary.get("validation_metrics") or {}).items()
              if not isinstance(v, (dict, list))]
    lines += ["", "## stage seconds", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in (summary.get("stage_seconds") or {}).items()]
    return "\n".join(lines)


def user_id_commands(config_pbtxt: Path, url: str, user_column: str, user_id: Any, args: list[str],
                     item: Optional[tuple[str, Any]] = None) -> dict:
    """``recsys recommend`` and a curl command for a user-id request (a version with a feature snapshot).
    ``item`` (a ranking version: the item column and an id): the curl command scores that item for the user
    (no ``recsys recommend``: that asks a top-k version)."""
    extra = " ".join(shlex.quote(a) for a in args)
    if item is not None:
        body = request_body(config_pbtxt, {user_column: user_id, item[0]: item[1]}, only=[user_column, item[0]])
        return {"curl_user": f"curl -s {url} -H 'Content-Type: application/json' -d "
                             + shlex.quote(json.dumps(body, separators=(",", ":")))}
    body = request_body(config_pbtxt, {user_column: user_id}, only=[user_column])
    return {"recommend": f"{uv_command()} run recsys recommend {shlex.quote(str(user_id))} --k 10"
                         + (f" {extra}" if extra else ""),
            "curl_user": f"curl -s {url} -H 'Content-Type: application/json' -d "
                         + shlex.quote(json.dumps(body, separators=(",", ":")))}
