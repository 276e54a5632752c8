//! API tokens: hashed records in the store, an in-memory index for the request path, scopes,
//! flag-set bindings and per-token rate limits.
//!
//! A token is shown once, at creation (`bnt_` + 48 hex digits of randomness); only its SHA-256 is
//! stored. Records live in the node's store for now (DESIGN.md §10 moves them into a replicated
//! system document later, so a token made in one region works in all).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::{header, HeaderMap, StatusCode};
use bunting_store::Store;
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
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
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Why a request was refused before it reached a handler.
pub enum Refusal {
    Unauthenticated(&'static str),
    Forbidden(String),
    RateLimited(u64),
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
        }
    }
}

impl Tokens {
    /// Loads every token record from the store.
    pub fn load(store: Arc<dyn Store>, per_second: u32, burst: u32) -> Result<Tokens, NodeError> {
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let tokens = Tokens {
            by_hash: ArcSwap::from_pointee(HashMap::new()),
            store,
            writer: Mutex::new(()),
            limiter: RateLimiter::keyed(quota),
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

    /// Finds the caller by the token in `Authorization: Bearer` or `X-API-Key`, checks its scope
    /// and flag set, and charges its rate limit. No lock, no storage access.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        query_key: Option<&str>,
        scope: Scope,
        flag_set: Option<&str>,
    ) -> Result<Arc<Principal>, Refusal> {
        let principal = self.authenticate(headers, query_key)?;
        if let Err(wait) = self.limiter.check_key(&principal.token_id) {
            let wait = wait.wait_time_from(self.limiter_clock_now());
            return Err(Refusal::RateLimited(retry_after_secs(wait)));
        }
        if !principal.has_scope(scope) {
            return Err(Refusal::Forbidden(format!(
                "token {} lacks the {} scope",
                principal.token_id,
                scope.as_str()
            )));
        }
        if let Some(set) = flag_set {
            if !principal.may_use(set) {
                return Err(Refusal::Forbidden(format!(
                    "token {} is not bound to flag set {set:?}",
                    principal.token_id
                )));
            }
        }
        Ok(principal)
    }

    fn limiter_clock_now(&self) -> governor::clock::QuantaInstant {
        governor::clock::DefaultClock::default().now()
    }

    fn authenticate(
        &self,
        headers: &HeaderMap,
        query_key: Option<&str>,
    ) -> Result<Arc<Principal>, Refusal> {
        let token = presented_token(headers)
            .or(query_key)
            .ok_or(Refusal::Unauthenticated(
                "no API key: send Authorization: Bearer TOKEN or X-API-Key: TOKEN",
            ))?;
        self.by_hash
            .load()
            .get(&sha256(token))
            .cloned()
            .ok_or(Refusal::Unauthenticated(
                "the API key is not valid (unknown or revoked)",
            ))
    }
}

/// The token a request carries, if any.
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim())
            .filter(|t| !t.is_empty());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
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
