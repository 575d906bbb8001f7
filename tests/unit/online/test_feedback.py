"""Feedback files: good rows accepted, every bad row kept aside with its line and reason."""
import pandas as pd

from pipeline_lib.online import feedback as fb


def test_bad_rows_are_kept_aside_with_the_reason_and_good_rows_accepted(tmp_path):
    src = tmp_path / "events.csv"
    src.write_text("request_id,user_id,item_id,event,ts\n"
                   "r1,,7,click,2026-12-07T06:00:00Z\n"         # good: by request id
                   ",u2,9,purchase,1796622400\n"                # good: by user + item, epoch seconds
                   "r3,,,click,2026-12-07T06:00:00Z\n"          # no item
                   ",,5,click,2026-12-07T06:00:00Z\n"           # no request or user
                   "r4,,5,like,2026-12-07T06:00:00Z\n"          # unknown event
                   "r5,,5,click,yesterday\n")                   # not a time
    result = fb.ingest(src, tmp_path / "fb")
    assert (result.accepted, result.rejected) == (2, 4)
    accepted = fb.read_accepted(tmp_path / "fb")
    assert list(accepted.request_id) == ["r1", ""] and list(accepted.user_id) == ["", "u2"]
    assert list(accepted.event) == ["click", "purchase"]
    assert accepted.ts[1] == pd.Timestamp(1796622400, unit="s", tz="UTC")
    rejected = pd.read_csv(result.rejected_file, dtype=str, keep_default_na=False)
    assert list(rejected.line) == ["4", "5", "6", "7"]
    assert list(rejected.reason) == ["no item_id", "neither request_id nor user_id given",
                                     "event 'like' is not one of click, purchase",
                                     "ts 'yesterday' is not a time (ISO 8601 or epoch seconds)"]
    assert "4 rejected" in result.line() and str(result.rejected_file) in result.line()


def test_a_file_without_a_needed_column_or_unreadable_is_rejected_whole_with_the_reason(tmp_path):
    (tmp_path / "no_item.csv").write_text("user_id,ts\nu1,2026-12-07T06:00:00Z\n")
    result = fb.ingest(tmp_path / "no_item.csv", tmp_path / "fb")
    assert (result.accepted, result.rejected, result.reasons) == (0, 1, {"no item_id column": 1})
    (tmp_path / "x.xlsx").write_text("?")
    result = fb.ingest(tmp_path / "x.xlsx", tmp_path / "fb")
    assert result.accepted == 0 and "unknown format '.xlsx'" in next(iter(result.reasons))


def test_the_inbox_is_drained_into_accepted_and_processed(tmp_path):
    inbox = tmp_path / "fb" / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "a.jsonl").write_text('{"user_id": "u1", "item_id": 3, "ts": "2026-12-07T06:00:00Z"}\n')
    results = fb.drain_inbox(tmp_path / "fb")
    assert [r.accepted for r in results] == [1] and not list(inbox.iterdir())
    assert (tmp_path / "fb" / "processed" / "a.jsonl").exists()
    assert list(fb.read_accepted(tmp_path / "fb").item_id) == ["3"]
