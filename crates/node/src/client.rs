//! The admin CLI's side of the admin REST API: one request per command, JSON printed to stdout.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::cli::{FlagsArgs, FlagsCommand, Remote, TokensArgs, TokensCommand};
use crate::NodeError;

fn encode(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn call(
    remote: &Remote,
    method: Method,
    path: &str,
    body: Option<Value>,
    message: Option<&str>,
) -> Result<Value, NodeError> {
    let client = reqwest::Client::new();
    let url = format!("{}{}", remote.url.trim_end_matches('/'), path);
    if let Err(e) = reqwest::Url::parse(&url) {
        return Err(NodeError::Client(format!(
            "invalid URL {:?} (--url / BUNTING_URL): {e}",
            remote.url
        )));
    }
    // Writes carry an idempotency key, so the retries below apply a write at most once.
    let key = (method != Method::GET).then(idempotency_key);
    let mut attempt = 0;
    let (status, value) = loop {
        attempt += 1;
        let mut request = client.request(method.clone(), &url);
        if let Some(token) = &remote.token {
            request = request.bearer_auth(token);
        }
        if let Some(m) = message {
            request = request.header("x-change-message", m);
        }
        if let Some(k) = &key {
            request = request.header("idempotency-key", k);
        }
        if let Some(b) = &body {
            request = request.json(b);
        }
        let response = request
            .send()
            .await
            .map_err(|e| NodeError::Client(describe(&url, &e)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| NodeError::Client(describe(&url, &e)))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        // A write applied but not yet stored: ask again with the same key for its outcome.
        let pending =
            status == reqwest::StatusCode::SERVICE_UNAVAILABLE && value["error"] == "write_pending";
        if !(pending && key.is_some() && attempt < WRITE_ATTEMPTS) {
            break (status, value);
        }
    };
    if status.is_success() {
        Ok(value)
    } else {
        Err(NodeError::Client(format!(
            "{status}: {}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )))
    }
}

/// How often the CLI sends a write whose answer was "pending" (with the same idempotency key).
const WRITE_ATTEMPTS: u32 = 3;

/// A fresh idempotency key: 128 random bits in hex (a clock-based one if randomness fails).
fn idempotency_key() -> String {
    let mut bytes = [0u8; 16];
    match getrandom::fill(&mut bytes) {
        Ok(()) => hex::encode(bytes),
        Err(_) => format!("cli-{}-{}", std::process::id(), crate::driver::now_ms()),
    }
}

/// Says what failed, from the error's whole source chain ("error sending request" alone does not
/// tell a refused connection from a DNS failure).
fn describe(url: &str, e: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut refused = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        let text = err.to_string();
        if !causes.iter().any(|c: &String| c.contains(&text)) {
            causes.push(text);
        }
        source = err.source();
    }
    let chain = causes.join(": ").to_lowercase();
    let host = e
        .url()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let what = if e.is_timeout() {
        format!("timed out waiting for {url}")
    } else if refused {
        format!("connection refused to {url}: is a node listening there?")
    } else if chain.contains("dns error") || chain.contains("lookup") {
        format!("DNS lookup failed for host {host:?} ({url})")
    } else if chain.contains("tls") || chain.contains("certificate") || chain.contains("https") {
        format!("TLS error talking to {url}")
    } else if e.is_builder() {
        format!("invalid request URL {url}")
    } else if e.is_connect() {
        format!("could not connect to {url}")
    } else {
        format!("request to {url} failed")
    };
    format!("{what} ({})", causes.join(": "))
}

fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Runs `bunting flags ...`.
pub async fn flags(args: FlagsArgs) -> Result<(), NodeError> {
    let set = encode(&args.flag_set);
    let r = &args.remote;
    let out = match args.command {
        FlagsCommand::List => {
            call(
                r,
                Method::GET,
                &format!("/api/v1/flagsets/{set}/flags"),
                None,
                None,
            )
            .await?
        }
        FlagsCommand::Get { key } => {
            call(
                r,
                Method::GET,
                &format!("/api/v1/flagsets/{set}/flags/{}", encode(&key)),
                None,
                None,
            )
            .await?
        }
        FlagsCommand::Apply { file, message } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| NodeError::Client(format!("{}: {e}", file.display())))?;
            let doc: Value = serde_json::from_str(&text)
                .map_err(|e| NodeError::Client(format!("{}: not JSON: {e}", file.display())))?;
            call(
                r,
                Method::PUT,
                &format!("/api/v1/flagsets/{set}"),
                Some(doc),
                message.as_deref(),
            )
            .await?
        }
        FlagsCommand::Toggle {
            key,
            on,
            off,
            message,
        } => {
            let body = match (on, off) {
                (true, _) => json!({"state": "ENABLED"}),
                (_, true) => json!({"state": "DISABLED"}),
                _ => json!({}),
            };
            call(
                r,
                Method::POST,
                &format!("/api/v1/flagsets/{set}/flags/{}/toggle", encode(&key)),
                Some(body),
                message.as_deref(),
            )
            .await?
        }
        FlagsCommand::History { key, limit, offset } => {
            let path = match key {
                Some(k) => format!("/api/v1/flagsets/{set}/flags/{}/history", encode(&k)),
                None => format!("/api/v1/flagsets/{set}/history"),
            };
            call(
                r,
                Method::GET,
                &format!("{path}?limit={limit}&offset={offset}"),
                None,
                None,
            )
            .await?
        }
        FlagsCommand::Conflicts => {
            call(
                r,
                Method::GET,
                &format!("/api/v1/flagsets/{set}/conflicts"),
                None,
                None,
            )
            .await?
        }
    };
    print(&out);
    Ok(())
}

/// Runs `bunting tokens ...`.
pub async fn tokens(args: TokensArgs) -> Result<(), NodeError> {
    let r = &args.remote;
    let out = match args.command {
        TokensCommand::Create {
            name,
            scopes,
            flag_sets,
        } => {
            let mut body = json!({"name": name, "scopes": scopes});
            if !flag_sets.is_empty() {
                body["flagSets"] = json!(flag_sets);
            }
            call(r, Method::POST, "/api/v1/tokens", Some(body), None).await?
        }
        TokensCommand::List => call(r, Method::GET, "/api/v1/tokens", None, None).await?,
        TokensCommand::Revoke { id } => {
            call(
                r,
                Method::DELETE,
                &format!("/api/v1/tokens/{}", encode(&id)),
                None,
                None,
            )
            .await?
        }
    };
    print(&out);
    Ok(())
}

/// Whether a status is one the CLI reports as "not found" (exit code 2 in main).
pub fn is_not_found(status: StatusCode) -> bool {
    status == StatusCode::NOT_FOUND
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn error_for(url: &str) -> String {
        let remote = Remote {
            url: url.into(),
            token: None,
        };
        match call(&remote, Method::GET, "/api/v1/status", None, None).await {
            Err(NodeError::Client(m)) => m,
            other => panic!("expected a client error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_bad_url_is_called_an_invalid_url() {
        let m = error_for("127.0.0.1:8080").await;
        assert!(m.contains("invalid URL"), "{m}");
        let m = error_for("http://exa mple.com").await;
        assert!(m.contains("invalid URL"), "{m}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_called_refused_with_its_url() {
        // A port that was just free: nothing listens there now.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let m = error_for(&format!("http://127.0.0.1:{port}")).await;
        assert!(m.contains("connection refused"), "{m}");
        assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");
    }
}
