import orjson
import pytest
from pydantic import ValidationError

from driftloop.core.contracts import TOPICS, Click, Impression, Label, Prediction, RetrainRequest


def imp(**kw):
    base = dict(user_id="u1", ad_id="a1", campaign_id="c1", device="mobile", country="US", position=2, bid=1.5)
    return Impression(**{**base, **kw})


def test_roundtrip_keeps_every_field():
    i = imp()
    back = Impression.from_bytes(i.to_bytes())
    assert back == i
    assert len(i.event_id) == 32 and i.ts > 1_600_000_000_000_000


@pytest.mark.parametrize("bad", [dict(device="fridge"), dict(position=0), dict(bid=-1), dict(country="USA"),
                                 dict(user_id="")])
def test_invalid_fields_rejected(bad):
    with pytest.raises(ValidationError):
        imp(**bad)


def test_unknown_fields_and_schema_version_rejected():
    raw = orjson.loads(imp().to_bytes())
    with pytest.raises(ValidationError):
        Impression.model_validate({**raw, "extra": 1})
    with pytest.raises(ValidationError, match="schema_version 2"):
        Impression.model_validate({**raw, "schema_version": 2})


def test_label_prediction_and_request_contracts():
    assert Label(impression_id="x", user_id="u", label=1).label == 1
    with pytest.raises(ValidationError):
        Label(impression_id="x", user_id="u", label=2)
    with pytest.raises(ValidationError):
        Prediction(user_id="u", model_name="m", model_version="1", score=1.5, features={}, latency_s=0)
    r = RetrainRequest(model_name="m", reason="webhook")
    assert r.request_id and r.since_ts is None
    with pytest.raises(ValidationError):
        RetrainRequest(model_name="m", reason="because")
    assert Click(impression_id="i", user_id="u", ad_id="a").impression_id == "i"


def test_topic_table_matches_architecture():
    assert set(TOPICS) == {"events.impressions", "events.clicks", "labels", "predictions", "predictions.shadow",
                           "drift.reports", "retrain.requests", "models.promoted", "models.rejected", "dlq"}
