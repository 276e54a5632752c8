//! OFREP, the OpenFeature Remote Evaluation Protocol (open-feature/protocol, service/openapi.yaml):
//! single-flag and bulk evaluation, with ETag / If-None-Match on bulk and `eventStreams` (ADR 0008)
//! pointing at the flag set's change stream.
//!
//! This is the hot path: one atomic snapshot load, one token-hash lookup, one body parse, the
//! evaluation, and a response written straight into a buffer (variant values were rendered to
//! JSON when the flag set was compiled).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bunting_engine::{ErrorCode, EvaluationContext, Resolution};
use bunting_model::limits::MAX_JSON_DEPTH;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::auth::{client_ip, valid_set_name, Principal, Refusal, Scope};
use crate::error::ApiError;
use crate::http::AppState;
use crate::snapshot::Snapshot;

/// Seconds of client inactivity after which a browser should close its event stream.
const INACTIVITY_DELAY_SECS: u64 = 120;

/// An OFREP error body without a flag key: `{"errorCode"?, "errorDetails"}`.
fn failure(status: StatusCode, code: Option<&str>, details: impl Into<String>) -> ApiError {
    let mut body = Map::new();
    if let Some(code) = code {
        body.insert("errorCode".into(), Value::String(code.into()));
    }
    body.insert("errorDetails".into(), Value::String(details.into()));
    ApiError::raw(status, Value::Object(body))
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::Unauthenticated(why) => failure(StatusCode::UNAUTHORIZED, None, why),
        Refusal::Forbidden(why) => failure(StatusCode::FORBIDDEN, None, why),
        Refusal::RateLimited(secs) => {
            let mut e = failure(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                format!("rate limit exceeded; retry after {secs} s"),
            );
            e.retry_after = Some(secs);
            e
        }
        Refusal::Throttled(secs) => {
            let mut e = failure(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                format!("too many failed authentications from this address; retry after {secs} s"),
            );
            e.retry_after = Some(secs);
            e
        }
    }
}

/// An OFREP caller and the flag set it evaluates, found from the headers alone: the key is
/// checked (and charged once) before the body is read.
pub struct Evaluator {
    principal: Arc<Principal>,
    snapshot: Arc<Snapshot>,
}

impl FromRequestParts<Arc<AppState>> for Evaluator {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if !state.is_ready() {
            return Err(failure(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the node is still loading its flag sets",
            ));
        }
        let principal = state
            .tokens
            .authorize(&parts.headers, client_ip(parts), Scope::Evaluate, None)
            .map_err(refusal)?;
        let requested = match parts.headers.get("x-flag-set") {
            None => None,
            Some(v) => match v.to_str() {
                Ok(name) if valid_set_name(name) => Some(name),
                _ => {
                    return Err(failure(
                        StatusCode::BAD_REQUEST,
                        None,
                        "X-Flag-Set must be a flag set name: 1-64 letters, digits, '-' or '_'",
                    ))
                }
            },
        };
        let set = principal.evaluation_flag_set(requested);
        if !principal.may_use(set) {
            return Err(failure(
                StatusCode::FORBIDDEN,
                None,
                format!(
                    "token {} is not bound to flag set {set:?}",
                    principal.token_id
                ),
            ));
        }
        let snapshot = state.snapshots.get(set).ok_or_else(|| {
            failure(
                StatusCode::NOT_FOUND,
                None,
                format!("flag set {set:?} does not exist"),
            )
        })?;
        Ok(Evaluator {
            principal,
            snapshot,
        })
    }
}

/// What every OFREP request needs before evaluating: the caller's flag set and the context.
struct Prepared {
    snapshot: Arc<Snapshot>,
    principal: Arc<Principal>,
    context: EvaluationContext,
    /// The raw body, which identifies the context for the bulk ETag.
    body: Bytes,
}

fn prepare(
    state: &AppState,
    evaluator: Evaluator,
    body: Result<Bytes, BytesRejection>,
    flag_key: Option<&str>,
) -> Result<Prepared, ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            failure(
                status,
                None,
                format!(
                    "request body is larger than the limit of {} bytes",
                    state.limits.max_evaluation_body_bytes
                ),
            )
        } else {
            bad_request(flag_key, "PARSE_ERROR", rejection.body_text())
        }
    })?;
    let context = parse_context(&body, flag_key)?;
    Ok(Prepared {
        snapshot: evaluator.snapshot,
        principal: evaluator.principal,
        context,
        body,
    })
}

fn bad_request(flag_key: Option<&str>, code: &str, details: impl Into<String>) -> ApiError {
    let mut e = failure(StatusCode::BAD_REQUEST, Some(code), details);
    if let (Some(key), Value::Object(m)) = (flag_key, &mut e.body) {
        m.insert("key".into(), Value::String(key.to_owned()));
    }
    e
}

/// Reads `{"context": {...}}`. A body that is not JSON is PARSE_ERROR; a context that is not an
/// object, or nests deeper than the model's limit, is INVALID_CONTEXT.
fn parse_context(body: &[u8], flag_key: Option<&str>) -> Result<EvaluationContext, ApiError> {
    let now = crate::driver::now_ms() as i64 / 1000;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(EvaluationContext::new(now));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            bad_request(
                flag_key,
                "INVALID_CONTEXT",
                format!("request nests deeper than the limit of {MAX_JSON_DEPTH} (MAX_JSON_DEPTH)"),
            )
        } else {
            bad_request(
                flag_key,
                "PARSE_ERROR",
                format!("request body is not valid JSON: {e}"),
            )
        }
    })?;
    let Value::Object(mut request) = value else {
        return Err(bad_request(
            flag_key,
            "INVALID_CONTEXT",
            "the request body must be a JSON object with a context member",
        ));
    };
    let context = request.remove("context").unwrap_or(Value::Null);
    if json_depth(&context) > MAX_JSON_DEPTH {
        return Err(bad_request(
            flag_key,
            "INVALID_CONTEXT",
            format!("context nests deeper than the limit of {MAX_JSON_DEPTH} (MAX_JSON_DEPTH)"),
        ));
    }
    match context {
        Value::Object(map) => {
            if let Some(tk) = map.get("targetingKey") {
                if !tk.is_string() {
                    return Err(bad_request(
                        flag_key,
                        "INVALID_CONTEXT",
                        "context.targetingKey must be a string",
                    ));
                }
            }
            Ok(EvaluationContext::from_map(map, now))
        }
        Value::Null => Ok(EvaluationContext::new(now)),
        _ => Err(bad_request(
            flag_key,
            "INVALID_CONTEXT",
            "context must be a JSON object",
        )),
    }
}

/// Nesting depth of a JSON value (a scalar is 0), measured without recursion.
pub fn json_depth(value: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                max = max.max(d + 1);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            Value::Object(o) => {
                max = max.max(d + 1);
                stack.extend(o.values().map(|c| (c, d + 1)));
            }
            _ => max = max.max(d),
        }
    }
    max
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The metadata key that marks an answer from a stale node (one that has heard from no peer for
/// the configured time, so it may lag the rest of the cluster).
pub const STALE_METADATA_KEY: &str = "bunting.stale";

/// Writes a metadata object, with `"bunting.stale": true` first when `stale`.
fn write_metadata(out: &mut Vec<u8>, metadata: &Map<String, Value>, stale: bool) {
    let start = out.len();
    let _ = serde_json::to_writer(&mut *out, metadata);
    if stale && out.get(start) == Some(&b'{') {
        let empty = out.len() == start + 2;
        let marker = format!(
            "{{\"{STALE_METADATA_KEY}\":true{}",
            if empty { "" } else { "," }
        );
        out.splice(start..start + 1, marker.bytes());
    }
}

/// Writes one resolution in OFREP's shape: success `{key, value?, variant?, reason, metadata}`,
/// failure `{key, errorCode, errorDetails, metadata}`.
fn write_resolution(out: &mut Vec<u8>, key: &str, r: &Resolution, stale: bool) {
    out.extend_from_slice(b"{\"key\":");
    push_str(out, key);
    if let Some(code) = r.error_code {
        out.extend_from_slice(b",\"errorCode\":\"");
        out.extend_from_slice(code.as_str().as_bytes());
        out.push(b'"');
        if let Some(d) = &r.error_details {
            out.extend_from_slice(b",\"errorDetails\":");
            push_str(out, d);
        }
    } else {
        if let Some(v) = &r.value {
            out.extend_from_slice(b",\"value\":");
            out.extend_from_slice(v.json().as_bytes());
        }
        if let Some(v) = &r.variant {
            out.extend_from_slice(b",\"variant\":");
            push_str(out, v);
        }
        out.extend_from_slice(b",\"reason\":\"");
        out.extend_from_slice(r.reason.as_str().as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"metadata\":");
    write_metadata(out, &r.metadata, stale);
    out.push(b'}');
}

/// One span per evaluation, with OpenTelemetry's feature-flag attributes.
fn trace_evaluation(flag_set: &str, key: &str, r: &Resolution) {
    let _span = tracing::info_span!(
        target: crate::telemetry::EVALUATION_TARGET,
        "feature_flag.evaluation",
        feature_flag.key = key,
        feature_flag.set.id = flag_set,
        feature_flag.provider.name = "bunting",
        feature_flag.result.variant = r.variant.as_deref().unwrap_or(""),
        feature_flag.result.reason = r.reason.as_str(),
        error.type = r.error_code.map(|c| c.as_str()).unwrap_or(""),
    )
    .entered();
}

/// `POST /ofrep/v1/evaluate/flags/{key}`.
pub async fn evaluate_flag(
    State(state): State<Arc<AppState>>,
    evaluator: Evaluator,
    Path(key): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = match prepare(&state, evaluator, body, Some(&key)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let r = prepared.snapshot.compiled.evaluate(&key, &prepared.context);
    prepared.snapshot.count(&key, &r);
    if state.trace_evaluations {
        trace_evaluation(&prepared.snapshot.name, &key, &r);
    }
    let status = match r.error_code {
        None => StatusCode::OK,
        Some(ErrorCode::FlagNotFound) => StatusCode::NOT_FOUND,
        Some(_) => StatusCode::BAD_REQUEST,
    };
    let mut out = Vec::with_capacity(256);
    write_resolution(&mut out, &key, &r, state.stale_for_ms().is_some());
    json_response(status, out)
}

/// `POST /ofrep/v1/evaluate/flags`: every flag, with an ETag that names both the flag set's
/// version and the context, so `If-None-Match` gives 304 exactly when the answer is unchanged.
pub async fn evaluate_all(
    State(state): State<Arc<AppState>>,
    evaluator: Evaluator,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = match prepare(&state, evaluator, body, None) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let snapshot = &prepared.snapshot;
    let etag = {
        let mut h = Sha256::new();
        h.update(snapshot.version.as_bytes());
        h.update([0]);
        h.update(&prepared.body);
        format!("\"{}\"", hex::encode(&h.finalize()[..12]))
    };
    let etag_header = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if etag_matches(inm, &etag) {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut().insert(header::ETAG, etag_header);
            return r;
        }
    }
    let results = snapshot.compiled.evaluate_all(&prepared.context);
    let stale = state.stale_for_ms().is_some();
    let mut out = Vec::with_capacity(64 + results.len() * 160);
    out.extend_from_slice(b"{\"flags\":[");
    for (i, (key, r)) in results.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        snapshot.count(key, r);
        if state.trace_evaluations {
            trace_evaluation(&snapshot.name, key, r);
        }
        write_resolution(&mut out, key, r, false);
    }
    out.extend_from_slice(b"],\"metadata\":");
    write_metadata(&mut out, snapshot.compiled.metadata(), stale);
    // Never the caller's key in a URL: an SDK key gets a short-lived credential that opens this
    // stream only; any other token gets the bare URL and sends its key in a header.
    let credential = prepared.principal.evaluates_only().then(|| {
        state
            .tokens
            .stream_credential(&snapshot.name, crate::driver::now_ms() / 1000)
    });
    let stream = event_stream_uri(&snapshot.name, credential.as_deref());
    out.extend_from_slice(b",\"eventStreams\":");
    let _ = serde_json::to_writer(
        &mut out,
        &json!([{
            "type": "sse",
            "endpoint": {"requestUri": stream},
            "inactivityDelaySec": INACTIVITY_DELAY_SECS,
        }]),
    );
    out.push(b'}');
    let mut r = json_response(StatusCode::OK, out);
    r.headers_mut().insert(header::ETAG, etag_header);
    r
}

/// The change stream of a flag set, with a stream credential as a query parameter when given
/// (a browser's EventSource cannot send headers).
fn event_stream_uri(flag_set: &str, credential: Option<&str>) -> String {
    let path = format!("/api/v1/flagsets/{}/stream", percent_encode(flag_set));
    match credential {
        Some(c) => format!("{path}?streamToken={}", percent_encode(c)),
        None => path,
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `If-None-Match` matches when any listed tag (weak or strong) equals ours, or it is `*`.
fn etag_matches(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        assert!(etag_matches("\"a\", W/\"b\"", "\"b\""));
        assert!(etag_matches("*", "\"x\""));
        assert!(!etag_matches("\"a\"", "\"b\""));
    }

    #[test]
    fn context_must_be_an_object_and_not_too_deep() {
        let err = parse_context(br#"{"context": [1]}"#, Some("f")).unwrap_err();
        assert_eq!(err.body["errorCode"], "INVALID_CONTEXT");
        assert_eq!(err.body["key"], "f");
        let deep = format!(
            "{{\"context\":{{\"a\":{}1{}}}}}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        let err = parse_context(deep.as_bytes(), None).unwrap_err();
        assert!(err.body["errorDetails"]
            .as_str()
            .unwrap()
            .contains("MAX_JSON_DEPTH"));
        let err = parse_context(b"{nope", None).unwrap_err();
        assert_eq!(err.body["errorCode"], "PARSE_ERROR");
        let ctx = parse_context(br#"{"context": {"targetingKey": "u1", "a": 1}}"#, None).unwrap();
        assert_eq!(ctx.targeting_key.as_deref(), Some("u1"));
    }

    #[test]
    fn a_stale_answer_carries_the_marker_in_its_metadata() {
        let mut out = Vec::new();
        let owner = json!({"owner": "growth"}).as_object().unwrap().clone();
        write_metadata(&mut out, &Map::new(), true);
        assert_eq!(String::from_utf8_lossy(&out), r#"{"bunting.stale":true}"#);
        out.clear();
        write_metadata(&mut out, &owner, true);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"bunting.stale": true, "owner": "growth"}));
        out.clear();
        write_metadata(&mut out, &owner, false);
        assert_eq!(String::from_utf8_lossy(&out), r#"{"owner":"growth"}"#);
    }

    #[test]
    fn percent_encoding_keeps_unreserved_characters() {
        assert_eq!(percent_encode("a b/c~"), "a%20b%2Fc~");
    }
}
