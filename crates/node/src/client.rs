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
    let mut request = client.request(method, &url);
    if let Some(token) = &remote.token {
        request = request.bearer_auth(token);
    }
    if let Some(m) = message {
        request = request.header("x-change-message", m);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request
        .send()
        .await
        .map_err(|e| NodeError::Client(format!("{url}: {e}")))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| NodeError::Client(format!("{url}: {e}")))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        Ok(value)
    } else {
        Err(NodeError::Client(format!(
            "{status}: {}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )))
    }
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
