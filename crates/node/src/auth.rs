//! API tokens: hashed records in the store, an in-memory index for the request path, scopes,
//! flag-set bindings and per-token rate limits.
//!
//! A token is shown once, at creation (`bnt_` + 48 hex digits of randomness); only its SHA-256 is
//! stored. Records live in the node's store for now (DESIGN.md §10 moves them into a replicated
//! system document later, so a token made in one region works in all).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::extract::{ConnectInfo, FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use bunting_store::Store;
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::http::AppState;
use crate::NodeError;

/// What a token may do. `admin` includes every other scope; `write` includes `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything, including tokens.
    Admin,
    /// Change flags (and read them).
    Write,
    /// Read flags, history and conflicts through the admin API.
    Read,
    /// Evaluate flags over OFREP and follow the change stream (an SDK key).
    Evaluate,
}

impl Scope {
    fn grants(self, needed: Scope) -> bool {
        matches!(
            (self, needed),
            (Scope::Admin, _)
                | (Scope::Write, Scope::Write | Scope::Read)
                | (Scope::Read, Scope::Read)
                | (Scope::Evaluate, Scope::Evaluate)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Write => "write",
            Scope::Read => "read",
            Scope::Evaluate => "evaluate",
        }
    }
}

/// Flag-set binding meaning "every flag set".
pub const ALL_FLAG_SETS: &str = "*";

/// Token id of the token given by `BUNTING_ADMIN_TOKEN`.
pub const BOOTSTRAP_TOKEN_ID: &str = "bootstrap-admin";
/// The id of the SDK key given by `BUNTING_SDK_KEY`.
pub const BOOTSTRAP_SDK_TOKEN_ID: &str = "bootstrap-sdk";

/// A token as stored (JSON in the store's token record); never contains the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// A human name, e.g. `checkout-service production`.
    pub name: String,
    /// Hex SHA-256 of the whole token.
    pub sha256: String,
    pub scopes: Vec<Scope>,
    /// Flag sets the token may touch; `["*"]` for all.
    pub flag_sets: Vec<String>,
    pub created_ms: u64,
    /// Set when revoked; a revoked token is refused, its record kept for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

impl TokenRecord {
    /// The record as the admin API shows it (without the hash).
    pub fn public_json(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "name": self.name,
            "scopes": self.scopes,
            "flagSets": self.flag_sets,
            "createdMs": self.created_ms,
            "revokedMs": self.revoked_ms,
        })
    }
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// The token id, recorded in the metadata of every change this caller makes.
    pub token_id: Arc<str>,
    scopes: Vec<Scope>,
    flag_sets: Vec<String>,
}

impl Principal {
    pub fn has_scope(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| s.grants(needed))
    }

    /// Refuses a caller without `scope`, or not bound to `flag_set` when one is given.
    pub fn check(&self, scope: Scope, flag_set: Option<&str>) -> Result<(), Refusal> {
        if !self.has_scope(scope) {
            return Err(Refusal::Forbidden(format!(
                "token {} lacks the {} scope",
                self.token_id,
                scope.as_str()
            )));
        }
        if let Some(set) = flag_set {
            if !self.may_use(set) {
                return Err(Refusal::Forbidden(format!(
                    "token {} is not bound to flag set {set:?}",
                    self.token_id
                )));
            }
        }
        Ok(())
    }

    /// Whether this caller may be handed a stream credential in a URL: SDK keys only, never a
    /// token that can read or change flags.
    pub fn evaluates_only(&self) -> bool {
        self.scopes.iter().all(|s| *s == Scope::Evaluate)
    }

    pub fn may_use(&self, flag_set: &str) -> bool {
        self.flag_sets
            .iter()
            .any(|s| s == ALL_FLAG_SETS || s == flag_set)
    }

    /// The flag set an SDK key evaluates: its only bound set; else the one the request names
    /// (`X-Flag-Set`), else `default`.
    pub fn evaluation_flag_set<'a>(&'a self, requested: Option<&'a str>) -> &'a str {
        match (self.flag_sets.as_slice(), requested) {
            ([only], _) if only != ALL_FLAG_SETS => only,
            (_, Some(r)) => r,
            _ => "default",
        }
    }
}

/// The token index and the rate limiter.
pub struct Tokens {
    /// SHA-256 of the token → principal; swapped whole on every change, read without a lock.
    by_hash: ArcSwap<HashMap<[u8; 32], Arc<Principal>>>,
    store: Arc<dyn Store>,
    /// Serialises changes to the records so two creations cannot lose each other's index update.
    writer: Mutex<()>,
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    /// Failed authentications per client address (guessing is slowed per address).
    failures: FailureThrottle,
    /// Signs stream credentials. Derived from the bootstrap admin token when one is given (so every
    /// node of a cluster started with the same token accepts the others' credentials); random per
    /// node otherwise.
    stream_key: ArcSwap<[u8; 32]>,
    /// SHA-256 of the metrics token (`BUNTING_METRICS_TOKEN`), when one is configured.
    metrics_hash: ArcSwap<Option<[u8; 32]>>,
}

/// Failed authentications one address may make at once before it is throttled.
pub const FAILED_AUTH_BURST: u32 = 10;
/// Failed authentications one address may make per minute after its burst.
pub const FAILED_AUTH_PER_MINUTE: u32 = 10;
/// Shortest bootstrap token (admin, SDK or metrics) accepted at start.
pub const MIN_BOOTSTRAP_TOKEN_CHARS: usize = 32;
/// How long a stream credential handed out in `eventStreams` stays valid for opening a stream.
pub const STREAM_CREDENTIAL_TTL_SECS: u64 = 15 * 60;
/// Addresses tracked before stale ones are dropped (bounds memory under a spray of addresses).
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// Slows guessing: every failed authentication from an address takes a cell of that address's
/// quota; an address that has none left is refused (429) until its quota refills, whatever token
/// it sends. Addresses with no failures cost one atomic load per request.
struct FailureThrottle {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Address → refused until; only addresses that ran out.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// Whether `blocked` may be non-empty, so the hot path skips the lock.
    any_blocked: AtomicBool,
}

impl FailureThrottle {
    fn new() -> FailureThrottle {
        let per_minute = NonZeroU32::new(FAILED_AUTH_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(FAILED_AUTH_BURST).unwrap_or(NonZeroU32::MIN);
        FailureThrottle {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            blocked: Mutex::new(HashMap::new()),
            any_blocked: AtomicBool::new(false),
        }
    }

    /// Refuses an address that is throttled.
    fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        if !self.any_blocked.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let result = match blocked.get(&ip) {
            Some(until) if *until > now => Err(Refusal::Throttled(retry_after_secs(*until - now))),
            Some(_) => {
                blocked.remove(&ip);
                Ok(())
            }
            None => Ok(()),
        };
        if blocked.is_empty() {
            self.any_blocked.store(false, Ordering::Release);
        }
        result
    }

    /// Records a failure; `Some(refusal)` when the address has now run out.
    fn failed(&self, ip: IpAddr) -> Option<Refusal> {
        if self.limiter.len() > MAX_TRACKED_ADDRESSES {
            self.limiter.retain_recent();
        }
        let wait = match self.limiter.check_key(&ip) {
            Ok(()) => return None,
            Err(not_until) => {
                not_until.wait_time_from(governor::clock::DefaultClock::default().now())
            }
        };
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if blocked.len() > MAX_TRACKED_ADDRESSES {
            blocked.retain(|_, until| *until > now);
        }
        blocked.insert(ip, now + wait);
        self.any_blocked.store(true, Ordering::Release);
        Some(Refusal::Throttled(retry_after_secs(wait)))
    }
}

/// HMAC-SHA256 (RFC 2104), for stream credentials.
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// Compares without an early exit, so timing does not tell how much of a guess was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn stream_mac(key: &[u8; 32], flag_set: &str, expires_secs: u64) -> [u8; 32] {
    hmac_sha256(
        key,
        format!("bunting stream\0{flag_set}\0{expires_secs}").as_bytes(),
    )
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Why a request was refused before it reached a handler.
pub enum Refusal {
    /// No key, or one that is not valid (401).
    Unauthenticated(&'static str),
    /// A valid key without the scope or flag set the request needs (403).
    Forbidden(String),
    /// The token's request quota is spent; retry after so many seconds (429).
    RateLimited(u64),
    /// Too many failed authentications from the client's address; retry after (429).
    Throttled(u64),
}

impl Refusal {
    /// As an admin API error.
    pub fn into_api_error(self) -> ApiError {
        match self {
            Refusal::Unauthenticated(why) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", why)
            }
            Refusal::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why),
            Refusal::RateLimited(secs) => {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("this token's rate limit is exhausted; retry after {secs} s"),
                );
                e.retry_after = Some(secs);
                e
            }
            Refusal::Throttled(secs) => {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "throttled",
                    format!(
                        "too many failed authentications from this address; retry after {secs} s"
                    ),
                );
                e.retry_after = Some(secs);
                e
            }
        }
    }
}

impl Tokens {
    /// Loads every token record from the store.
    pub fn load(store: Arc<dyn Store>, per_second: u32, burst: u32) -> Result<Tokens, NodeError> {
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let mut stream_key = [0u8; 32];
        getrandom::fill(&mut stream_key)
            .map_err(|e| NodeError::Config(format!("no randomness for the stream key: {e}")))?;
        let tokens = Tokens {
            by_hash: ArcSwap::from_pointee(HashMap::new()),
            store,
            writer: Mutex::new(()),
            limiter: RateLimiter::keyed(quota),
            failures: FailureThrottle::new(),
            stream_key: ArcSwap::from_pointee(stream_key),
            metrics_hash: ArcSwap::from_pointee(None),
        };
        tokens.reindex()?;
        Ok(tokens)
    }

    fn records(&self) -> Result<Vec<TokenRecord>, NodeError> {
        self.store
            .tokens()?
            .into_iter()
            .map(|(id, bytes)| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| NodeError::Corrupt(format!("token record {id}: {e}")))
            })
            .collect()
    }

    fn reindex(&self) -> Result<(), NodeError> {
        let mut map = HashMap::new();
        for r in self.records()? {
            if r.revoked_ms.is_some() {
                continue;
            }
            let Ok(bytes) = hex::decode(&r.sha256) else {
                continue;
            };
            let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice()) else {
                continue;
            };
            map.insert(
                hash,
                Arc::new(Principal {
                    token_id: Arc::from(r.id.as_str()),
                    scopes: r.scopes,
                    flag_sets: r.flag_sets,
                }),
            );
        }
        self.by_hash.store(Arc::new(map));
        Ok(())
    }

    fn put(&self, record: &TokenRecord) -> Result<(), NodeError> {
        let bytes = serde_json::to_vec(record).map_err(|e| NodeError::Corrupt(e.to_string()))?;
        self.store.put_token(&record.id, &bytes)?;
        Ok(())
    }

    /// Stores the bootstrap admin token (replacing an earlier one). Blocking.
    pub fn bootstrap(&self, secret: &str, now_ms: u64) -> Result<(), NodeError> {
        // Nodes of one cluster share the bootstrap token, so they share the stream key too; the
        // key reveals nothing about the token (one-way, domain-separated).
        self.stream_key.store(Arc::new(
            Sha256::new()
                .chain_update(b"bunting stream credential key v1\0")
                .chain_update(secret.as_bytes())
                .finalize()
                .into(),
        ));
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.put(&TokenRecord {
            id: BOOTSTRAP_TOKEN_ID.into(),
            name: "bootstrap admin (BUNTING_ADMIN_TOKEN)".into(),
            sha256: hex::encode(sha256(secret)),
            scopes: vec![Scope::Admin],
            flag_sets: vec![ALL_FLAG_SETS.into()],
            created_ms: now_ms,
            revoked_ms: None,
        })?;
        self.reindex()
    }

    /// Stores the bootstrap SDK key: evaluate scope on the flag set `default` (replacing an
    /// earlier one). Blocking.
    pub fn bootstrap_sdk(&self, secret: &str, now_ms: u64) -> Result<(), NodeError> {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.put(&TokenRecord {
            id: BOOTSTRAP_SDK_TOKEN_ID.into(),
            name: "bootstrap SDK key (BUNTING_SDK_KEY)".into(),
            sha256: hex::encode(sha256(secret)),
            scopes: vec![Scope::Evaluate],
            flag_sets: vec![crate::driver::DEFAULT_FLAG_SET.into()],
            created_ms: now_ms,
            revoked_ms: None,
        })?;
        self.reindex()
    }

    /// Creates a token and returns its record and its secret (shown once). Blocking.
    pub fn create(
        &self,
        name: String,
        scopes: Vec<Scope>,
        flag_sets: Vec<String>,
        now_ms: u64,
    ) -> Result<(TokenRecord, String), NodeError> {
        let mut random = [0u8; 30];
        getrandom::fill(&mut random)
            .map_err(|e| NodeError::Config(format!("no randomness for a token: {e}")))?;
        let id = format!("tok_{}", hex::encode(&random[..6]));
        let secret = format!("bnt_{}", hex::encode(&random[6..]));
        let record = TokenRecord {
            id,
            name,
            sha256: hex::encode(sha256(&secret)),
            scopes,
            flag_sets,
            created_ms: now_ms,
            revoked_ms: None,
        };
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.put(&record)?;
        self.reindex()?;
        Ok((record, secret))
    }

    /// Revokes a token; `None` when there is no such token. Blocking.
    pub fn revoke(&self, id: &str, now_ms: u64) -> Result<Option<TokenRecord>, NodeError> {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bytes) = self.store.token(id)? else {
            return Ok(None);
        };
        let mut record: TokenRecord = serde_json::from_slice(&bytes)
            .map_err(|e| NodeError::Corrupt(format!("token record {id}: {e}")))?;
        if record.revoked_ms.is_none() {
            record.revoked_ms = Some(now_ms);
            self.put(&record)?;
            self.reindex()?;
        }
        Ok(Some(record))
    }

    /// Every record, revoked ones included. Blocking.
    pub fn list(&self) -> Result<Vec<TokenRecord>, NodeError> {
        self.records()
    }

    /// Sets the token that opens `/metrics` (besides any token with the read scope).
    pub fn set_metrics_token(&self, secret: &str) {
        self.metrics_hash.store(Arc::new(Some(sha256(secret))));
    }

    /// Finds the caller by the token in `Authorization: Bearer` or `X-API-Key` and charges its
    /// rate limit, once. A client address that failed too often is refused first; a failure
    /// counts against the address. No lock (unless some address is throttled), no storage access.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Result<Arc<Principal>, Refusal> {
        if let Some(ip) = client {
            self.failures.check(ip)?;
        }
        let principal = presented_token(headers).and_then(|token| {
            self.by_hash
                .load()
                .get(&sha256(token.ok_or(Refusal::Unauthenticated(
                    "no API key: send Authorization: Bearer TOKEN or X-API-Key: TOKEN",
                ))?))
                .cloned()
                .ok_or(Refusal::Unauthenticated(
                    "the API key is not valid (unknown or revoked)",
                ))
        });
        let principal = match principal {
            Ok(p) => p,
            Err(refusal) => return Err(self.failed(client, refusal)),
        };
        if let Err(wait) = self.limiter.check_key(&principal.token_id) {
            let wait = wait.wait_time_from(self.limiter_clock_now());
            return Err(Refusal::RateLimited(retry_after_secs(wait)));
        }
        Ok(principal)
    }

    /// [`Tokens::authenticate`], then the scope and flag-set checks.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
        scope: Scope,
        flag_set: Option<&str>,
    ) -> Result<Arc<Principal>, Refusal> {
        let principal = self.authenticate(headers, client)?;
        principal.check(scope, flag_set)?;
        Ok(principal)
    }

    /// Counts a failure of a real attempt (a missing key is not a guess) and says what to answer.
    fn failed(&self, client: Option<IpAddr>, refusal: Refusal) -> Refusal {
        let guessed =
            !matches!(refusal, Refusal::Unauthenticated(m) if m.starts_with("no API key"));
        match client {
            Some(ip) if guessed => self.failures.failed(ip).unwrap_or(refusal),
            _ => refusal,
        }
    }

    fn limiter_clock_now(&self) -> governor::clock::QuantaInstant {
        governor::clock::DefaultClock::default().now()
    }

    /// A credential that opens the change stream of `flag_set`, and nothing else, until
    /// [`STREAM_CREDENTIAL_TTL_SECS`] from `now_secs`; safe to put in a URL.
    pub fn stream_credential(&self, flag_set: &str, now_secs: u64) -> String {
        let expires = now_secs + STREAM_CREDENTIAL_TTL_SECS;
        let mac = stream_mac(&self.stream_key.load(), flag_set, expires);
        format!("bsc1.{expires}.{}", hex::encode(mac))
    }

    /// Opens the stream of `flag_set`: with a stream credential from the query, or else with a
    /// key (evaluate scope) in a header. Failures count against the client's address.
    pub fn authorize_stream(
        &self,
        headers: &HeaderMap,
        credential: Option<&str>,
        client: Option<IpAddr>,
        flag_set: &str,
        now_secs: u64,
    ) -> Result<(), Refusal> {
        let Some(credential) = credential else {
            return self
                .authorize(headers, client, Scope::Evaluate, Some(flag_set))
                .map(|_| ());
        };
        if let Some(ip) = client {
            self.failures.check(ip)?;
        }
        let valid = credential
            .strip_prefix("bsc1.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(expires, mac)| Some((expires.parse::<u64>().ok()?, hex::decode(mac).ok()?)))
            .filter(|(expires, mac)| {
                *expires > now_secs
                    && same_bytes(
                        mac,
                        &stream_mac(&self.stream_key.load(), flag_set, *expires),
                    )
            })
            .is_some();
        if valid {
            Ok(())
        } else {
            Err(self.failed(
                client,
                Refusal::Unauthenticated(
                    "the stream credential is not valid for this flag set, or has expired: \
                     fetch the bulk evaluation again for a fresh eventStreams URL",
                ),
            ))
        }
    }

    /// Opens `/metrics`: the metrics token, or any token with the read scope.
    pub fn authorize_metrics(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Result<(), Refusal> {
        if let (Some(expected), Ok(Some(token))) =
            (self.metrics_hash.load().as_ref(), presented_token(headers))
        {
            if same_bytes(expected, &sha256(token)) {
                return Ok(());
            }
        }
        self.authorize(headers, client, Scope::Read, None)
            .map(|_| ())
    }
}

/// The token a request carries, if any. A token with whitespace around it is refused rather than
/// trimmed: what was sent is not the token.
pub fn presented_token(headers: &HeaderMap) -> Result<Option<&str>, Refusal> {
    const PADDED: Refusal = Refusal::Unauthenticated(
        "the API key has whitespace around it: send the key alone, without spaces",
    );
    const UNREADABLE: Refusal = Refusal::Unauthenticated("the API key header is not visible ASCII");
    let token = if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| UNREADABLE)?;
        let Some((scheme, rest)) = v.split_once(' ') else {
            return Ok(None);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        rest
    } else if let Some(v) = headers.get("x-api-key") {
        v.to_str().map_err(|_| UNREADABLE)?
    } else {
        return Ok(None);
    };
    if token.is_empty() {
        return Ok(None);
    }
    if token.trim() != token || token.contains(char::is_whitespace) {
        return Err(PADDED);
    }
    Ok(Some(token))
}

/// Checks a bootstrap token given as `variable`: long enough to resist guessing, no whitespace.
pub fn check_bootstrap_token(variable: &str, secret: &str) -> Result<(), String> {
    if secret.chars().count() < MIN_BOOTSTRAP_TOKEN_CHARS {
        return Err(format!(
            "{variable} must be at least {MIN_BOOTSTRAP_TOKEN_CHARS} characters (it has {}); \
             make one with: openssl rand -hex 24",
            secret.chars().count()
        ));
    }
    if secret.contains(char::is_whitespace) {
        return Err(format!("{variable} must not contain whitespace"));
    }
    Ok(())
}

/// A flag-set name: 1-64 ASCII letters, digits, `-` or `_` (the same rule for paths, bodies,
/// `X-Flag-Set` and token bindings).
pub fn valid_set_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The client's address, when the server recorded it (tests that call the router directly have
/// none, and so no per-address throttle).
pub fn client_ip(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The client's address as an extractor (`None` when the server did not record it).
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(parts)))
    }
}

/// The scope a [`Caller`] needs, as a type.
pub trait Needs: Send + Sync + 'static {
    const SCOPE: Scope;
}
/// [`Caller`] with the admin scope.
pub struct AdminScope;
/// [`Caller`] with the write scope.
pub struct WriteScope;
/// [`Caller`] with the read scope.
pub struct ReadScope;
impl Needs for AdminScope {
    const SCOPE: Scope = Scope::Admin;
}
impl Needs for WriteScope {
    const SCOPE: Scope = Scope::Write;
}
impl Needs for ReadScope {
    const SCOPE: Scope = Scope::Read;
}

/// An admin API caller, authenticated and charged once per request from the headers alone, before
/// any body is read; bound to the path's `{set}` when the route has one.
pub struct Caller<N>(pub Arc<Principal>, pub PhantomData<N>);

impl<N: Needs> FromRequestParts<Arc<AppState>> for Caller<N> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let principal = state
            .tokens
            .authenticate(&parts.headers, client_ip(parts))
            .map_err(Refusal::into_api_error)?;
        let params = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|p| p.0)
            .unwrap_or_default();
        let set = params.get("set").map(String::as_str);
        if let Some(set) = set {
            if !valid_set_name(set) {
                return Err(ApiError::not_found(format!(
                    "flag set {set:?} does not exist (a name is 1-64 letters, digits, '-' or '_')"
                )));
            }
        }
        principal
            .check(N::SCOPE, set)
            .map_err(Refusal::into_api_error)?;
        Ok(Caller(principal, PhantomData))
    }
}

/// A caller allowed to read `/metrics`.
pub struct MetricsReader;

impl FromRequestParts<Arc<AppState>> for MetricsReader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        state
            .tokens
            .authorize_metrics(&parts.headers, client_ip(parts))
            .map_err(Refusal::into_api_error)?;
        Ok(MetricsReader)
    }
}

fn retry_after_secs(wait: Duration) -> u64 {
    // Retry-After has whole seconds; rounding up never invites a retry that is refused again.
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use bunting_store::MemoryStore;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn admin_includes_every_scope_and_write_includes_read() {
        for s in [Scope::Admin, Scope::Write, Scope::Read, Scope::Evaluate] {
            assert!(Scope::Admin.grants(s));
        }
        assert!(Scope::Write.grants(Scope::Read));
        assert!(!Scope::Read.grants(Scope::Write));
        assert!(!Scope::Evaluate.grants(Scope::Read));
        assert!(!Scope::Write.grants(Scope::Evaluate));
    }

    #[test]
    fn created_token_is_stored_hashed_and_works_until_revoked() {
        let store = Arc::new(MemoryStore::new());
        let tokens = Tokens::load(store.clone(), 100, 100).unwrap();
        let (record, secret) = tokens
            .create("sdk".into(), vec![Scope::Evaluate], vec!["prod".into()], 1)
            .unwrap();
        let stored = String::from_utf8(store.token(&record.id).unwrap().unwrap()).unwrap();
        assert!(!stored.contains(&secret), "the secret must never be stored");
        let h = headers("x-api-key", &secret);
        let p = tokens
            .authorize(&h, None, Scope::Evaluate, Some("prod"))
            .ok()
            .unwrap();
        assert_eq!(&*p.token_id, record.id);
        assert!(matches!(
            tokens.authorize(&h, None, Scope::Evaluate, Some("staging")),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            tokens.authorize(&h, None, Scope::Read, Some("prod")),
            Err(Refusal::Forbidden(_))
        ));
        tokens.revoke(&record.id, 2).unwrap().unwrap();
        let h = headers("authorization", &format!("Bearer {secret}"));
        assert!(matches!(
            tokens.authorize(&h, None, Scope::Evaluate, Some("prod")),
            Err(Refusal::Unauthenticated(_))
        ));
        // A fresh index from the store agrees: revocation is durable.
        let reloaded = Tokens::load(store, 100, 100).unwrap();
        assert!(reloaded
            .authorize(&h, None, Scope::Evaluate, Some("prod"))
            .is_err());
    }

    #[test]
    fn the_bootstrap_sdk_key_evaluates_default_and_nothing_more() {
        let tokens = Tokens::load(Arc::new(MemoryStore::new()), 100, 100).unwrap();
        tokens.bootstrap_sdk("same-on-every-node", 0).unwrap();
        let h = headers("authorization", "Bearer same-on-every-node");
        let p = tokens
            .authorize(&h, None, Scope::Evaluate, Some("default"))
            .ok()
            .unwrap();
        assert_eq!(&*p.token_id, BOOTSTRAP_SDK_TOKEN_ID);
        assert!(tokens
            .authorize(&h, None, Scope::Evaluate, Some("staging"))
            .is_err());
        assert!(tokens.authorize(&h, None, Scope::Read, None).is_err());
        // Given again (every start), it replaces itself rather than piling up records.
        tokens.bootstrap_sdk("rotated", 1).unwrap();
        assert!(tokens.authorize(&h, None, Scope::Evaluate, None).is_err());
        assert_eq!(tokens.list().unwrap().len(), 1);
    }

    #[test]
    fn burst_exhausted_token_is_rate_limited_with_retry_after() {
        let tokens = Tokens::load(Arc::new(MemoryStore::new()), 1, 2).unwrap();
        tokens.bootstrap("root", 0).unwrap();
        let h = headers("authorization", "Bearer root");
        assert!(tokens.authorize(&h, None, Scope::Admin, None).is_ok());
        assert!(tokens.authorize(&h, None, Scope::Admin, None).is_ok());
        match tokens.authorize(&h, None, Scope::Admin, None) {
            Err(Refusal::RateLimited(secs)) => assert!(secs >= 1),
            _ => panic!("third request in a burst of 2 must be limited"),
        }
    }

    #[test]
    fn sdk_key_bound_to_one_set_evaluates_that_set() {
        let p = Principal {
            token_id: Arc::from("t"),
            scopes: vec![Scope::Evaluate],
            flag_sets: vec!["prod".into()],
        };
        assert_eq!(p.evaluation_flag_set(Some("other")), "prod");
        let all = Principal {
            token_id: Arc::from("t"),
            scopes: vec![Scope::Admin],
            flag_sets: vec![ALL_FLAG_SETS.into()],
        };
        assert_eq!(all.evaluation_flag_set(None), "default");
        assert_eq!(all.evaluation_flag_set(Some("x")), "x");
    }
}
