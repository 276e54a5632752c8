//! The physical limit of the HTTP stack, for bench/ofrep.sh: a bare axum handler that reads the
//! same request an OFREP evaluation reads (the API key header, the JSON body with its context) and
//! answers a fixed OFREP body. Bunting's OFREP path is measured against it with the same wrk
//! settings in the same run.
//!
//! `cargo run --release -p bunting-node --example bare_ofrep` prints `listening on http://ADDR`.

use axum::body::Bytes;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

const SINGLE: &str =
    r#"{"key":"flag-0","value":true,"variant":"on","reason":"STATIC","metadata":{}}"#;

fn parse(headers: &HeaderMap, body: &[u8]) -> Result<(), StatusCode> {
    let authorized =
        headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key");
    if !authorized {
        return Err(StatusCode::UNAUTHORIZED);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) if m.get("context").is_none_or(Value::is_object) => Ok(()),
        _ => Err(StatusCode::BAD_REQUEST),
    }
}

fn json(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let bulk: &'static str = Box::leak(
        format!(
            "{{\"flags\":[{}],\"metadata\":{{}}}}",
            (0..50)
                .map(|i| format!(r#"{{"key":"flag-{i}","value":true,"variant":"on","reason":"STATIC","metadata":{{}}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        )
        .into_boxed_str(),
    );
    let app = Router::new()
        .route(
            "/ofrep/v1/evaluate/flags/{key}",
            post(|headers: HeaderMap, body: Bytes| async move {
                match parse(&headers, &body) {
                    Ok(()) => json(SINGLE),
                    Err(s) => s.into_response(),
                }
            }),
        )
        .route(
            "/ofrep/v1/evaluate/flags",
            post(move |headers: HeaderMap, body: Bytes| async move {
                match parse(&headers, &body) {
                    Ok(()) => json(bulk),
                    Err(s) => s.into_response(),
                }
            }),
        );
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
