//! OpenTelemetry export: with an OTLP endpoint configured, evaluation spans and evaluation counts
//! reach the collector with the feature-flag semantic-convention attributes.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::Router;
use common::{TestNode, ADMIN};
use serde_json::json;

type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A stand-in collector that keeps every OTLP/HTTP request body by signal.
async fn collector() -> (String, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route(
            "/v1/{signal}",
            post(
                |State(r): State<Received>, Path(signal): Path<String>, body: Bytes| async move {
                    r.lock().unwrap().push((signal, body.to_vec()));
                    ""
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluations_are_exported_as_spans_and_counts_with_feature_flag_attributes() {
    let (url, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.telemetry.otlp_endpoint = Some(url);
    config.telemetry.otlp_metrics_interval_ms = Some(200);
    let logging =
        bunting_node::telemetry::init(&config.telemetry, &config.node_id, &config.region).unwrap();
    let node = TestNode::start(config).await;
    for _ in 0..3 {
        let (s, _) = node
            .evaluate("button-color", ADMIN, json!({"targetingKey": "u1"}))
            .await;
        assert_eq!(s, 200);
    }
    node.stop().await.unwrap();
    // Dropping the guard flushes the span exporter (a blocking call).
    tokio::task::spawn_blocking(move || drop(logging))
        .await
        .unwrap();

    let got = received.lock().unwrap().clone();
    let metrics: Vec<&Vec<u8>> = got
        .iter()
        .filter(|(s, _)| s == "metrics")
        .map(|(_, b)| b)
        .collect();
    let traces: Vec<&Vec<u8>> = got
        .iter()
        .filter(|(s, _)| s == "traces")
        .map(|(_, b)| b)
        .collect();
    assert!(
        metrics
            .iter()
            .any(|b| contains(b, "feature_flag.evaluations")
                && contains(b, "feature_flag.key")
                && contains(b, "button-color")
                && contains(b, "feature_flag.result.variant")
                && contains(b, "green")),
        "no evaluation counts among {} metric exports",
        metrics.len()
    );
    assert!(
        traces.iter().any(|b| contains(b, "feature_flag.evaluation")
            && contains(b, "feature_flag.key")
            && contains(b, "button-color")
            && contains(b, "feature_flag.result.variant")),
        "no evaluation span among {} trace exports",
        traces.len()
    );
}
