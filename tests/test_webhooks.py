import json

from tasks.track import webhooks

SECRET = "s3cret"
BODY = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "3"}}).encode()


def headers(secret=SECRET, timestamp="1000", body=BODY):
    return {"X-MLflow-Signature": webhooks.signature(secret, "d-1", timestamp, body),
            "X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": timestamp}


def test_verify_accepts_an_authentic_fresh_delivery():
    assert webhooks.verify(SECRET, headers(), BODY, now=1010) is None


def test_verify_rejects_a_wrong_secret():
    assert "does not match" in webhooks.verify(SECRET, headers(secret="other"), BODY, now=1010)


def test_verify_rejects_a_tampered_body():
    assert "does not match" in webhooks.verify(SECRET, headers(), BODY.replace(b'"3"', b'"4"'), now=1010)


def test_verify_rejects_a_replayed_delivery():
    assert "timestamp" in webhooks.verify(SECRET, headers(), BODY, now=1000 + 3600)


def test_verify_rejects_missing_headers():
    assert "missing" in webhooks.verify(SECRET, {}, BODY, now=1000)


def test_new_model_version_reads_name_and_version():
    assert webhooks.new_model_version(json.loads(BODY)) == ("m", "3")
    assert webhooks.new_model_version({"entity": "model_version_alias", "action": "created"}) is None
