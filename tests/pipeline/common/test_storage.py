"""Storage helpers: credentials never reach logs, and URI joins keep their scheme."""
from __future__ import annotations

import pytest

from segmill.pipeline.common.storage import join_uri, protocol_of, redact


@pytest.mark.parametrize(
    "text, expected",
    [
        ("s3://user:pass@bucket/data/x.png", "s3://bucket/data/x.png"),
        ("https://alice:s3cr3t@minio.local:9000/bucket/a.png", "https://minio.local:9000/bucket/a.png"),
        ("could not open https://alice:s3cr3t@host/x.png: denied", "could not open https://host/x.png: denied"),
        ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ],
)
def test_redact_removes_userinfo(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_removes_secret_query_values() -> None:
    url = "https://host/bucket/a.png?X-Amz-Signature=abc&token=xyz&X-Amz-Credential=AKIA/2024&versionId=3"
    redacted = redact(url)
    assert "abc" not in redacted and "xyz" not in redacted and "AKIA" not in redacted
    assert redacted == "https://host/bucket/a.png?X-Amz-Signature=***&token=***&X-Amz-Credential=***&versionId=3"
    assert redact("https://u:p@host/a?token=xyz") == "https://host/a?token=***"


@pytest.mark.parametrize(
    "path",
    [
        "/data/scenes/images/scene_00001.png",
        "relative/labels/scene_00001.png",
        "s3://bucket/keys/tokenizer/model.pt",
        "file:///tmp/segmill/classes.yaml",
        "gs://bucket/prefix/part-0.parquet",
        "user@example.com wrote /tmp/a.png",
    ],
)
def test_redact_keeps_plain_paths(path: str) -> None:
    assert redact(path) == path


def test_redact_keeps_hive_partition_paths() -> None:
    path = "s3://bucket/events/key=2024/part-0.parquet"
    assert redact(path) == path


def test_redact_keeps_the_rest_of_a_message() -> None:
    assert redact("GET https://h/b/o?token=xyz failed: timeout") == "GET https://h/b/o?token=*** failed: timeout"


def test_join_uri_keeps_the_scheme() -> None:
    assert join_uri("s3://bucket/root/", "images", "/a.png") == "s3://bucket/root/images/a.png"
    assert join_uri("s3://bucket", "labels/") == "s3://bucket/labels"
    assert join_uri("/tmp/out", "images", "a.png") == "/tmp/out/images/a.png"
    assert join_uri("memory://x") == "memory://x"
    assert protocol_of(join_uri("s3://bucket", "a")) == "s3"
    assert protocol_of("/tmp/out") == "file"


def test_redact_values_cleans_a_spec_without_breaking_its_structure() -> None:
    from segmill.pipeline.common.storage import redact_values

    spec = {"input": "https://h/m.csv?token=S1", "endpoint_url": "http://u:p@host:9000",
            "labels": ["https://acct/c/x.png?sv=1&sig=S2"], "scales": [1.0]}
    assert redact_values(spec) == {"input": "https://h/m.csv?token=***", "endpoint_url": "http://host:9000",
                                   "labels": ["https://acct/c/x.png?sv=1&sig=***"], "scales": [1.0]}
