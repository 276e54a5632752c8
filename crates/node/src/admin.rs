//! The admin REST API under `/api/v1`: flag sets, flags, whole-set upload and download, history,
//! conflicts, broken flags, node status and tokens. JSON in and out; every validation error names
//! its field with a JSON Pointer; writes answer with the new document heads, and `If-Match` with
//! heads makes a write conditional (412 with the current values when they moved on).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bunting_model::json::StrictJsonError;
use bunting_model::limits::MAX_JSON_DEPTH;
use bunting_model::{pointer, DefaultVariant, Flag, FlagSet, FlagState, Problem, Problems};
use serde_json::{json, Value};

use crate::auth::{
    valid_set_name, AdminScope, Caller, Principal, ReadScope, Refusal, Scope, WriteScope,
};
use crate::driver::{
    now_ms, AdminWrite, Answer, DriverHandle, FlagPatch, Query, Refused, WriteMeta,
};
use crate::error::{problems_json, ApiError};
use crate::http::AppState;

type ApiResult = Result<Response, ApiError>;

fn driver(state: &AppState) -> Result<&DriverHandle, ApiError> {
    state.driver.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the node is still loading its flag sets",
        )
    })
}

/// Reads a JSON body within the size and depth limits.
fn json_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request body is larger than the limit of {} bytes (limits.max_admin_body_bytes)",
                    state.limits.max_admin_body_bytes
                ),
            )
            .with("limit", json!(state.limits.max_admin_body_bytes))
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_body", rejection.body_text())
        }
    })?;
    // Strict: duplicate keys and numbers that would change are refused with their pointer.
    bunting_model::json::parse_strict(&bytes).map_err(|e| match e {
        StrictJsonError::Syntax(m) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not valid JSON: {m}"),
        ),
        StrictJsonError::TooDeep(at) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_deep",
            format!("JSON nests deeper than the limit of {MAX_JSON_DEPTH} (MAX_JSON_DEPTH)"),
        )
        .with("limit", json!(MAX_JSON_DEPTH))
        .with("pointer", json!(at)),
        StrictJsonError::Inexact(problems) => ApiError::invalid(&problems),
    })
}

/// `If-Match: "HEAD.HEAD"` → the heads a write is based on.
fn if_match(headers: &HeaderMap) -> Option<Vec<String>> {
    let v = headers.get(header::IF_MATCH)?.to_str().ok()?.trim();
    let v = v.strip_prefix("W/").unwrap_or(v).trim_matches('"');
    Some(
        v.split(['.', ','])
            .map(|s| s.trim().trim_matches('"').to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    )
}

/// The heads as an entity tag, the form `If-Match` takes back.
pub fn heads_etag(heads: &[String]) -> String {
    format!("\"{}\"", heads.join("."))
}

fn meta(principal: &Principal, headers: &HeaderMap) -> WriteMeta {
    WriteMeta {
        token_id: principal.token_id.to_string(),
        message: headers
            .get("x-change-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .chars()
            .take(1024)
            .collect(),
        wall_time_ms: now_ms(),
    }
}

fn refused(r: Refused) -> ApiError {
    match r {
        Refused::UnknownFlagSet(s) => {
            ApiError::not_found(format!("flag set {s:?} does not exist")).with("flagSet", json!(s))
        }
        Refused::FlagSetExists(s) => ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("flag set {s:?} already exists"),
        ),
        Refused::FlagNotFound(k) => ApiError::not_found(format!("flag {k:?} does not exist"))
            .with("pointer", json!(pointer(["flags", &k]))),
        Refused::FlagExists(k) => ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("flag {k:?} already exists; use PUT to replace it"),
        )
        .with("pointer", json!(pointer(["flags", &k]))),
        Refused::Invalid(p) => ApiError::invalid(&p),
        Refused::Stale { current, heads } => ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "stale",
            "the flag set changed after the heads given in If-Match",
        )
        .with("current", json!(current))
        .with("heads", json!(heads)),
        Refused::Store(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_stored",
            format!("the write could not be stored and was not applied: {e}"),
        )
        .with("applied", json!(false)),
        Refused::TooLarge(e) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the write was not applied: {e}"),
        )
        .with("applied", json!(false)),
        Refused::Pending { idempotency_key } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "write_pending",
            match &idempotency_key {
                Some(_) => "the write is applied on this node but not yet stored; it will be \
                            stored or taken back: send it again with the same Idempotency-Key \
                            to get its outcome"
                    .to_owned(),
                None => "the write is applied on this node but not yet stored; it will be \
                         stored or taken back (send an Idempotency-Key with writes to be able \
                         to ask which)"
                    .to_owned(),
            },
        )
        .with("applied", json!("pending"))
        .with("idempotencyKey", json!(idempotency_key)),
        Refused::KeyReused(key) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!("Idempotency-Key {key:?} was used for a different write"),
        ),
        Refused::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the node is shutting down",
        ),
    }
}

fn with_heads(status: StatusCode, body: Value, heads: &[String]) -> Response {
    let mut r = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&heads_etag(heads)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

async fn write(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    set: &str,
    w: AdminWrite,
    status: StatusCode,
) -> ApiResult {
    let key = idempotency_key(headers)?;
    // Answer before the request's own timeout, so the client learns the write is pending
    // rather than getting a bare 408 for a write that goes on.
    let deadline = state
        .limits
        .request_timeout()
        .saturating_sub(WRITE_ANSWER_MARGIN)
        .max(WRITE_ANSWER_MARGIN);
    let heads = driver(state)?
        .write(
            set,
            w,
            if_match(headers),
            meta(principal, headers),
            key,
            deadline,
        )
        .await
        .map_err(refused)?;
    Ok(with_heads(status, json!({"heads": heads}), &heads))
}

/// How long before the request timeout a write that is not yet stored answers 503 pending.
const WRITE_ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The `Idempotency-Key` header: 1 to 256 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            !k.is_empty()
                && k.len() <= crate::idempotency::MAX_KEY_BYTES
                && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                format!(
                    "Idempotency-Key must be 1 to {} visible ASCII characters",
                    crate::idempotency::MAX_KEY_BYTES
                ),
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// `GET /api/v1/flagsets`
pub async fn list_sets(
    State(state): State<Arc<AppState>>,
    Caller(principal, _): Caller<ReadScope>,
) -> ApiResult {
    let sets = driver(&state)?.list().await.map_err(refused)?;
    let visible: Vec<Value> = sets
        .into_iter()
        .filter(|s| principal.may_use(&s.name))
        .map(|s| json!(s))
        .collect();
    Ok(Json(json!({"flagSets": visible})).into_response())
}

/// `POST /api/v1/flagsets` with `{"name": ...}`.
pub async fn create_set(
    State(state): State<Arc<AppState>>,
    caller: Caller<AdminScope>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value = json_body(&state, body)?;
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !valid_set_name(name) {
        return Err(ApiError::invalid(&Problems(vec![Problem::new(
            "/name",
            "name must be 1-64 letters, digits, '-' or '_'",
        )])));
    }
    let principal = caller.0;
    // The name comes from the body, so the binding is checked here (the token was checked, and
    // charged, before the body was read).
    principal
        .check(Scope::Admin, Some(name))
        .map_err(Refusal::into_api_error)?;
    let heads = driver(&state)?
        .create_flag_set(name, meta(&principal, &headers))
        .await
        .map_err(refused)?;
    Ok(with_heads(
        StatusCode::CREATED,
        json!({"name": name, "heads": heads}),
        &heads,
    ))
}

/// `GET /api/v1/flagsets/{set}`: the whole flag set as flagd JSON.
pub async fn download_set(
    State(state): State<Arc<AppState>>,
    _caller: Caller<ReadScope>,
    Path(set): Path<String>,
) -> ApiResult {
    let (answer, heads) = driver(&state)?
        .read(&set, Query::Document)
        .await
        .map_err(refused)?;
    let Answer::Document(doc) = answer else {
        return Err(ApiError::internal("unexpected answer"));
    };
    Ok(with_heads(StatusCode::OK, doc, &heads))
}

/// `PUT /api/v1/flagsets/{set}`: upload a whole flagd document, applied as a field-level diff.
pub async fn upload_set(
    State(state): State<Arc<AppState>>,
    caller: Caller<WriteScope>,
    Path(set): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value = json_body(&state, body)?;
    let parsed = FlagSet::from_value(&value).map_err(|p| ApiError::invalid(&p))?;
    write(
        &state,
        &caller.0,
        &headers,
        &set,
        AdminWrite::ReplaceSet { set: parsed },
        StatusCode::OK,
    )
    .await
}

/// `GET /api/v1/flagsets/{set}/flags`: every flag with its state.
pub async fn list_flags(
    State(state): State<Arc<AppState>>,
    _caller: Caller<ReadScope>,
    Path(set): Path<String>,
) -> ApiResult {
    let (answer, heads) = driver(&state)?
        .read(&set, Query::Document)
        .await
        .map_err(refused)?;
    let Answer::Document(doc) = answer else {
        return Err(ApiError::internal("unexpected answer"));
    };
    let flags = FlagSet::from_value_unvalidated(&doc)
        .map(|s| {
            s.flags
                .iter()
                .map(|(k, f)| {
                    json!({"key": k, "state": f.state.as_str(),
                           "variants": f.variants.keys().collect::<Vec<_>>(),
                           "defaultVariant": f.default_variant.key()})
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Ok(with_heads(
        StatusCode::OK,
        json!({"flags": flags, "heads": heads}),
        &heads,
    ))
}

/// `GET /api/v1/flagsets/{set}/flags/{key}`
pub async fn get_flag(
    State(state): State<Arc<AppState>>,
    _caller: Caller<ReadScope>,
    Path((set, key)): Path<(String, String)>,
) -> ApiResult {
    let (answer, heads) = driver(&state)?
        .read(&set, Query::Flag(key.clone()))
        .await
        .map_err(refused)?;
    match answer {
        Answer::Flag(Some(flag)) => Ok(with_heads(StatusCode::OK, flag, &heads)),
        _ => Err(refused(Refused::FlagNotFound(key))),
    }
}

fn parse_flag(key: &str, value: &Value) -> Result<Flag, ApiError> {
    let at = pointer(["flags", key]);
    let mut value = value.clone();
    if let Some(obj) = value.as_object_mut() {
        match obj.remove("key") {
            Some(Value::String(k)) if k != key => {
                return Err(ApiError::invalid(&Problems(vec![Problem::new(
                    format!("{at}/key"),
                    format!("key {k:?} differs from the key {key:?} in the URL"),
                )])))
            }
            _ => {}
        }
    }
    Flag::from_value(&value, &at).map_err(|p| ApiError::invalid(&p))
}

/// `POST /api/v1/flagsets/{set}/flags` with the flag and its `key`.
pub async fn create_flag(
    State(state): State<Arc<AppState>>,
    caller: Caller<WriteScope>,
    Path(set): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value = json_body(&state, body)?;
    let Some(key) = value.get("key").and_then(Value::as_str).map(str::to_owned) else {
        return Err(ApiError::invalid(&Problems(vec![Problem::new(
            "/key",
            "a new flag needs a string key",
        )])));
    };
    let flag = parse_flag(&key, &value)?;
    write(
        &state,
        &caller.0,
        &headers,
        &set,
        AdminWrite::CreateFlag { key, flag },
        StatusCode::CREATED,
    )
    .await
}

/// `PUT /api/v1/flagsets/{set}/flags/{key}`: create or replace.
pub async fn put_flag(
    State(state): State<Arc<AppState>>,
    caller: Caller<WriteScope>,
    Path((set, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value = json_body(&state, body)?;
    let flag = parse_flag(&key, &value)?;
    write(
        &state,
        &caller.0,
        &headers,
        &set,
        AdminWrite::PutFlag { key, flag },
        StatusCode::OK,
    )
    .await
}

/// Reads a patch: `state`, `defaultVariant`, `targeting` (null removes), `variants` and
/// `metadata` (maps whose null values remove entries). Every problem is reported.
fn parse_patch(key: &str, value: &Value) -> Result<FlagPatch, Problems> {
    let at = |m: &str| pointer(["flags", key, m]);
    let Some(obj) = value.as_object() else {
        return Err(Problems(vec![Problem::new(
            pointer(["flags", key]),
            "a patch must be a JSON object",
        )]));
    };
    let mut patch = FlagPatch::default();
    let mut problems = Vec::new();
    for (name, v) in obj {
        match name.as_str() {
            "state" => match v.as_str().and_then(FlagState::parse) {
                Some(s) => patch.state = Some(s),
                None => problems.push(Problem::new(
                    at("state"),
                    "state must be \"ENABLED\" or \"DISABLED\"",
                )),
            },
            "defaultVariant" => match v {
                Value::Null => patch.default_variant = Some(DefaultVariant::Null),
                Value::String(s) => patch.default_variant = Some(DefaultVariant::Key(s.clone())),
                _ => problems.push(Problem::new(
                    at("defaultVariant"),
                    "defaultVariant must be a string or null",
                )),
            },
            "targeting" => match v {
                Value::Null => patch.targeting = Some(None),
                Value::Object(_) => patch.targeting = Some(Some(v.clone())),
                _ => problems.push(Problem::new(
                    at("targeting"),
                    "targeting must be a JSON object or null",
                )),
            },
            "variants" | "metadata" => match v.as_object() {
                Some(m) => {
                    let entries = m
                        .iter()
                        .map(|(k, v)| (k.clone(), (!v.is_null()).then(|| v.clone())))
                        .collect();
                    if name == "variants" {
                        patch.variants = entries;
                    } else {
                        patch.metadata = entries;
                    }
                }
                None => problems.push(Problem::new(at(name), format!("{name} must be an object"))),
            },
            other => problems.push(Problem::new(
                at(other),
                "unknown field: a patch may set state, defaultVariant, targeting, variants, metadata",
            )),
        }
    }
    Problems(problems).into_result()?;
    Ok(patch)
}

/// `PATCH /api/v1/flagsets/{set}/flags/{key}`
pub async fn patch_flag(
    State(state): State<Arc<AppState>>,
    caller: Caller<WriteScope>,
    Path((set, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value = json_body(&state, body)?;
    let patch = parse_patch(&key, &value).map_err(|p| ApiError::invalid(&p))?;
    write(
        &state,
        &caller.0,
        &headers,
        &set,
        AdminWrite::PatchFlag { key, patch },
        StatusCode::OK,
    )
    .await
}

/// `DELETE /api/v1/flagsets/{set}/flags/{key}`
pub async fn delete_flag(
    State(state): State<Arc<AppState>>,
    caller: Caller<WriteScope>,
    Path((set, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    write(
        &state,
        &caller.0,
        &headers,
        &set,
        AdminWrite::DeleteFlag { key },
        StatusCode::OK,
    )
    .await
}

/// `POST /api/v1/flagsets/{set}/flags/{key}/toggle`, optionally with `{"state": ...}`; without
/// one the state flips.
pub async fn toggle_flag(
    State(state): State<Arc<AppState>>,
    caller: Caller<WriteScope>,
    Path((set, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let empty = matches!(&body, Ok(b) if b.iter().all(u8::is_ascii_whitespace));
    let target = if empty {
        None
    } else {
        let value = json_body(&state, body)?;
        match value.get("state") {
            None | Some(Value::Null) => None,
            Some(s) => Some(s.as_str().and_then(FlagState::parse).ok_or_else(|| {
                ApiError::invalid(&Problems(vec![Problem::new(
                    pointer(["flags", &key, "state"]),
                    "state must be \"ENABLED\" or \"DISABLED\"",
                )]))
            })?),
        }
    };
    write(
        &state,
        &caller.0,
        &headers,
        &set,
        AdminWrite::SetState { key, state: target },
        StatusCode::OK,
    )
    .await
}

/// `GET /api/v1/flagsets/{set}/history?flag=&offset=&limit=`
pub async fn history(
    State(state): State<Arc<AppState>>,
    _caller: Caller<ReadScope>,
    Path(set): Path<String>,
    QueryParams(params): QueryParams<HashMap<String, String>>,
) -> ApiResult {
    history_of(&state, set, params.get("flag").cloned(), &params).await
}

/// `GET /api/v1/flagsets/{set}/flags/{key}/history`
pub async fn flag_history(
    State(state): State<Arc<AppState>>,
    _caller: Caller<ReadScope>,
    Path((set, key)): Path<(String, String)>,
    QueryParams(params): QueryParams<HashMap<String, String>>,
) -> ApiResult {
    history_of(&state, set, Some(key), &params).await
}

async fn history_of(
    state: &AppState,
    set: String,
    flag: Option<String>,
    params: &HashMap<String, String>,
) -> ApiResult {
    let number = |name: &str| -> Result<usize, ApiError> {
        match params.get(name) {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("query parameter {name} must be a non-negative integer"),
                )
                .with("parameter", json!(name))
            }),
        }
    };
    let (offset, limit) = (number("offset")?, number("limit")?);
    let (answer, heads) = driver(state)?
        .read(
            &set,
            Query::History {
                flag,
                offset,
                limit,
            },
        )
        .await
        .map_err(refused)?;
    let Answer::History { entries, total } = answer else {
        return Err(ApiError::internal("unexpected answer"));
    };
    Ok(with_heads(
        StatusCode::OK,
        json!({"entries": entries, "total": total, "offset": offset, "heads": heads}),
        &heads,
    ))
}

/// `GET /api/v1/flagsets/{set}/conflicts`
pub async fn conflicts(
    State(state): State<Arc<AppState>>,
    _caller: Caller<ReadScope>,
    Path(set): Path<String>,
) -> ApiResult {
    let (answer, heads) = driver(&state)?
        .read(&set, Query::Conflicts)
        .await
        .map_err(refused)?;
    let Answer::Conflicts(list) = answer else {
        return Err(ApiError::internal("unexpected answer"));
    };
    Ok(with_heads(
        StatusCode::OK,
        json!({"conflicts": list, "heads": heads}),
        &heads,
    ))
}

/// `GET /api/v1/flagsets/{set}/broken`: flags that evaluate to ERROR, with their problems.
pub async fn broken(
    State(state): State<Arc<AppState>>,
    _caller: Caller<ReadScope>,
    Path(set): Path<String>,
) -> ApiResult {
    let snapshot = state
        .snapshots
        .get(&set)
        .ok_or_else(|| refused(Refused::UnknownFlagSet(set.clone())))?;
    let list: Vec<Value> = snapshot
        .compiled
        .broken_flags()
        .iter()
        .map(|b| json!({"key": b.key, "problems": problems_json(&Problems(b.problems.clone()))}))
        .collect();
    Ok(Json(json!({"broken": list, "heads": snapshot.heads})).into_response())
}

/// `GET /api/v1/status`
pub async fn status(State(state): State<Arc<AppState>>, _caller: Caller<ReadScope>) -> ApiResult {
    let sets: Vec<Value> = state
        .snapshots
        .names()
        .into_iter()
        .filter_map(|n| state.snapshots.get(&n))
        .map(|s| {
            json!({"name": &*s.name, "flags": s.compiled.len(),
                   "broken": s.compiled.broken_flags().len(), "heads": s.heads,
                   "version": s.version})
        })
        .collect();
    Ok(Json(json!({
        "node": state.identity.node,
        "region": state.identity.region,
        "incarnation": state.identity.incarnation,
        "ready": state.is_ready(),
        "uptimeSecs": state.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
        "flagSets": sets,
        "cluster": state.gossip.as_ref().map(|g| g.to_json()),
    }))
    .into_response())
}

/// `GET /api/v1/tokens`
pub async fn list_tokens(
    State(state): State<Arc<AppState>>,
    _caller: Caller<AdminScope>,
) -> ApiResult {
    let tokens = state.tokens.clone();
    let records = tokio::task::spawn_blocking(move || tokens.list())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let list: Vec<Value> = records.iter().map(|r| r.public_json()).collect();
    Ok(Json(json!({"tokens": list})).into_response())
}

/// `POST /api/v1/tokens` with `{"name", "scopes": [...], "flagSets": [...]}`; the answer holds
/// the token itself, shown this once.
pub async fn create_token(
    State(state): State<Arc<AppState>>,
    _caller: Caller<AdminScope>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let value = json_body(&state, body)?;
    let mut problems = Vec::new();
    let name = match value.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() && n.len() <= 200 => n.to_owned(),
        _ => {
            problems.push(Problem::new(
                "/name",
                "name must be a string of 1-200 bytes",
            ));
            String::new()
        }
    };
    let scopes: Vec<Scope> = match value.get("scopes").cloned().map(serde_json::from_value) {
        Some(Ok(s)) => s,
        _ => {
            problems.push(Problem::new(
                "/scopes",
                "scopes must be a list of admin, write, read, evaluate",
            ));
            Vec::new()
        }
    };
    if scopes.is_empty() && problems.iter().all(|p| p.pointer != "/scopes") {
        problems.push(Problem::new("/scopes", "give at least one scope"));
    }
    let flag_sets: Vec<String> = match value.get("flagSets") {
        None => vec![crate::auth::ALL_FLAG_SETS.into()],
        Some(v) => match serde_json::from_value::<Vec<String>>(v.clone()) {
            Ok(s) if !s.is_empty() => {
                // Bindings are names like paths' ("*" alone meaning every set): no "../*", no NUL.
                for (i, name) in s.iter().enumerate() {
                    if name != crate::auth::ALL_FLAG_SETS && !valid_set_name(name) {
                        problems.push(Problem::new(
                            format!("/flagSets/{i}"),
                            format!(
                                "{name:?} is not a flag set name: 1-64 letters, digits, '-' or \
                                 '_', or \"*\" for every set"
                            ),
                        ));
                    }
                }
                s
            }
            _ => {
                problems.push(Problem::new(
                    "/flagSets",
                    "flagSets must be a non-empty list of flag set names (or \"*\")",
                ));
                Vec::new()
            }
        },
    };
    Problems(problems)
        .into_result()
        .map_err(|p| ApiError::invalid(&p))?;
    let tokens = state.tokens.clone();
    let (record, secret) =
        tokio::task::spawn_blocking(move || tokens.create(name, scopes, flag_sets, now_ms()))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut body = record.public_json();
    if let Value::Object(m) = &mut body {
        m.insert("token".into(), Value::String(secret));
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /api/v1/tokens/{id}`
pub async fn revoke_token(
    State(state): State<Arc<AppState>>,
    _caller: Caller<AdminScope>,
    Path(id): Path<String>,
) -> ApiResult {
    let tokens = state.tokens.clone();
    let id2 = id.clone();
    let record = tokio::task::spawn_blocking(move || tokens.revoke(&id2, now_ms()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("token {id:?} does not exist")))?;
    Ok(Json(record.public_json()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_reports_every_bad_field_with_its_pointer() {
        let err = parse_patch(
            "f",
            &json!({"state": "MAYBE", "targeting": 3, "colour": "red"}),
        )
        .unwrap_err();
        let pointers: Vec<&str> = err.0.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            vec!["/flags/f/colour", "/flags/f/state", "/flags/f/targeting"]
        );
    }

    #[test]
    fn patch_null_removes_variants_and_targeting() {
        let p = parse_patch(
            "f",
            &json!({"variants": {"a": null, "b": 2}, "targeting": null}),
        )
        .unwrap();
        assert_eq!(
            p.variants,
            vec![("a".into(), None), ("b".into(), Some(json!(2)))]
        );
        assert_eq!(p.targeting, Some(None));
    }

    #[test]
    fn if_match_reads_back_the_heads_etag() {
        let mut h = HeaderMap::new();
        let tag = heads_etag(&["aa".into(), "bb".into()]);
        h.insert(header::IF_MATCH, HeaderValue::from_str(&tag).unwrap());
        assert_eq!(if_match(&h), Some(vec!["aa".to_owned(), "bb".to_owned()]));
    }
}
