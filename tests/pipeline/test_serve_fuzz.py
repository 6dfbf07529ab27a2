"""Hostile request bodies against a real `mlflow models serve` of the raw-input pyfunc, fuzzed.

One scoring server per family (the CNN: images; the Transformer: text), started once for the
module from the registry store's champions. Random bytes, malformed and oversized JSON, every
MLflow input format with wrong shapes and columns, pictures of odd sizes and modes as base64,
empty, huge, binary and invalid-UTF-8 texts: the server answers 200 with one prediction per row,
or 4xx with a JSON error body; never 5xx. Derandomized, so that CI is repeatable.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.servers import start_model_server, stop_process_group, wait_for_ping
from support.trained import RegistryStore

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FUZZ = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SENT: dict[str, int] = {}  # family -> requests sent, for the summary line
STATUSES: dict[str, Counter[int]] = {}  # family -> how the server answered them


@pytest.fixture(scope="module")
def servers(
    registry_store: RegistryStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """family -> URL of a scoring server for its champion; both start at once."""
    folder = tmp_path_factory.mktemp("serve-fuzz")
    started = time.monotonic()
    running = {
        family: (
            *start_model_server(f"models:/dlpipe-{family}@champion", registry_store.uri, log),
            log,
        )
        for family in ("cnn", "transformer")
        for log in [folder / f"{family}.log"]
    }
    try:
        for process, url, log in running.values():
            wait_for_ping(process, url, log, started)
        print(f"\n2 scoring servers ready in {time.monotonic() - started:.1f}s")
        yield {family: url for family, (_, url, _) in running.items()}
    finally:
        for process, _, _ in running.values():
            stop_process_group(process)
        print(f"HTTP fuzz requests sent: {SENT}")


def post(url: str, family: str, body: bytes, content_type: str | None) -> requests.Response:
    SENT[family] = SENT.get(family, 0) + 1
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{url}/invocations", data=body, headers=headers, timeout=60)


def assert_clean_answer(answer: requests.Response, rows: int | None, body: bytes) -> None:
    """200 with one prediction per row, or 4xx with a JSON error; never 5xx."""
    shown = body[:200]
    assert answer.status_code < 500, (answer.status_code, answer.text[:500], shown)
    if answer.status_code == 200:
        predictions = answer.json()["predictions"]
        if rows is not None:
            assert len(predictions) == rows, (predictions, shown)
        for row in predictions:
            assert abs(sum(row["probabilities"]) - 1.0) < 1e-5
        return
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    if answer.status_code == 415:  # MLflow's own refusal of a content type: one line of text
        assert answer.text.strip() and "\n" not in answer.text.strip(), answer.text[:500]
        return
    error = answer.json()
    assert isinstance(error, dict) and error.get("message"), answer.text[:500]
    # What MLflow answers when the model raised anything but an MlflowException: an error of
    # ours that escaped as something other than one clear line, or a crash in our code.
    unexpected = error["message"].startswith("Encountered an unexpected error while evaluating")
    assert not unexpected, (error.get("stack_trace", "")[-1500:], shown)


# --- what goes in the input column --------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def pictures(draw: st.DrawFn) -> str:
    """A base64 picture of odd size and mode, sometimes truncated or not base64 at all."""
    width, height = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "1", "P", "I;16"]))
    image = Image.new(mode, (width, height))
    if draw(st.booleans()):
        image.putdata([draw(st.integers(0, 1)) * 255] * (width * height))
    buffer = io.BytesIO()
    formats = ["PNG", "TIFF", *(["BMP"] if mode in ("1", "L", "P", "RGB") else [])]
    image.save(buffer, format=draw(st.sampled_from(formats)))
    data = buffer.getvalue()
    cut = draw(st.sampled_from([len(data), len(data), len(data) // 2, 8]))
    return base64.b64encode(data[:cut]).decode()


def texts() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.text(max_size=200),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=50),
        st.sampled_from(["", "   ", "\x00\x01", "<br /><br />", "a great film " * 3000]),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    )


def cell_values(family: str) -> st.SearchStrategy[Any]:
    own = pictures() if family == "cnn" else texts()
    return st.one_of(own, own, JSON_VALUES)


# --- whole bodies ------------------------------------------------------------------------------


@st.composite
def bodies(draw: st.DrawFn, family: str) -> tuple[bytes, str | None, int | None]:
    """(body, content type, rows a 200 must answer; None when the body is not a frame)."""
    column = "image" if family == "cnn" else "text"
    kind = draw(
        st.sampled_from(
            ["records", "records", "split", "instances", "inputs", "json", "bytes", "csv", "utf8"]
        )
    )
    if kind in ("records", "split", "instances", "inputs"):
        rows = draw(st.integers(0, 4))
        name = draw(st.sampled_from([column, column, column, "other", ""]))
        values = [draw(cell_values(family)) for _ in range(rows)]
        if kind == "records":
            payload: Any = {"dataframe_records": [{name: v} for v in values]}
        elif kind == "split":
            columns = draw(st.sampled_from([[name], [name, name], [], [name, "extra"]]))
            data = [draw(st.sampled_from([[v], [v, v], [], v])) for v in values]
            payload = {"dataframe_split": {"columns": columns, "data": data}}
        elif kind == "instances":
            payload = {"instances": values if draw(st.booleans()) else [{name: v} for v in values]}
        else:
            payload = {"inputs": {name: values} if draw(st.booleans()) else values}
        if draw(st.booleans()):
            payload[draw(st.text(max_size=6))] = draw(JSON_VALUES)  # an unexpected key
        expected = rows if kind == "records" and name == column else None
        return json.dumps(payload).encode(), "application/json", expected
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode(), "application/json", None
    if kind == "csv":
        lines = [column] + [str(draw(cell_values(family))).replace("\n", " ") for _ in range(2)]
        return "\n".join(lines).encode(), "text/csv", None
    if kind == "utf8":  # a JSON string holding bytes that are not UTF-8
        junk = draw(st.binary(min_size=1, max_size=20))
        return (
            b'{"dataframe_records": [{"' + column.encode() + b'": "' + junk + b'"}]}',
            ("application/json"),
            None,
        )
    # No Content-Type at all is left out: MLflow's server answers it 500 (a test below says so).
    content_type = draw(
        st.sampled_from(
            [
                "application/json",
                "text/csv",
                "application/octet-stream",
                "application/json; charset=latin-1",
                "application/json; format=pandas-split",
            ]
        )
    )
    return draw(st.binary(max_size=300)), content_type, None


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_the_scoring_server_answers_any_body_without_a_5xx(
    servers: dict[str, str], family: str
) -> None:
    url = servers[family]
    started = time.monotonic()

    @FUZZ
    @given(bodies(family))
    def check(case: tuple[bytes, str | None, int | None]) -> None:
        body, content_type, rows = case
        answer = post(url, family, body, content_type)
        STATUSES.setdefault(family, Counter())[answer.status_code] += 1
        assert_clean_answer(answer, rows, body)

    check()
    answered = dict(sorted(STATUSES[family].items()))
    print(f"\n{family}: {SENT[family]} requests in {time.monotonic() - started:.1f}s: {answered}")
    assert STATUSES[family][200] >= 20, answered  # the fuzz reaches the model, not only errors


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_valid_and_oversized_bodies(servers: dict[str, str], family: str) -> None:
    """Valid rows answer 200 (a server that refused everything would pass the fuzz); a body of
    many megabytes is an answer, not a crash."""
    url = servers[family]
    column = "image" if family == "cnn" else "text"
    picture = io.BytesIO()
    Image.new("L", (40, 30), 255).save(picture, format="PNG")
    good = base64.b64encode(picture.getvalue()).decode() if family == "cnn" else "a fine film"
    body = json.dumps({"dataframe_records": [{column: good}] * 3}).encode()
    answer = post(url, family, body, "application/json")
    assert answer.status_code == 200, answer.text[:500]
    assert_clean_answer(answer, 3, body)
    huge = json.dumps({"dataframe_records": [{column: "x" * (8 << 20)}]}).encode()
    assert_clean_answer(post(url, family, huge, "application/json"), 1, huge[:100])
    empty = {"text": "   "} if family == "transformer" else {"image": "aGVsbG8="}
    bad = json.dumps({"dataframe_records": [{column: good}, empty]}).encode()
    answer = post(url, family, bad, "application/json")
    assert answer.status_code == 400, answer.text[:500]
    error = answer.json()  # our one line, not MLflow's generic message and our traceback
    assert error["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in error
    expected = "empty text" if family == "transformer" else "not an image (expected PNG, JPEG"
    assert f"Error: row 1: {expected}" in error["message"], error
    many = json.dumps({"dataframe_records": [{column: good}] * 2000}).encode()
    assert_clean_answer(post(url, family, many, "application/json"), 2000, many[:100])


@pytest.mark.xfail(
    strict=True,
    reason="mlflow 3.17 scoring server: a POST without Content-Type fails in invocations() "
    "(None.split) before the model is called: 500 'Internal Server Error', text/plain",
)
@pytest.mark.parametrize("family", ["transformer"])
def test_a_body_without_a_content_type_is_refused_not_crashed(
    servers: dict[str, str], family: str
) -> None:
    body = json.dumps({"dataframe_records": [{"text": "a fine film"}]}).encode()
    answer = post(servers[family], family, body, None)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
