//! The HTTP server: shared state, the router, the change stream, health, readiness and metrics.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::{watch, Semaphore, SemaphorePermit};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tower::{Layer, Service};

use crate::admin;
use crate::auth::{ClientIp, MetricsReader, Tokens};
use crate::config::LimitsConfig;
use crate::driver::{DriverHandle, Identity};
use crate::error::ApiError;
use crate::ofrep;
use crate::snapshot::Snapshots;

/// What every handler shares.
pub struct AppState {
    pub snapshots: Arc<Snapshots>,
    pub tokens: Arc<Tokens>,
    /// Set once the flag sets are loaded; admin calls answer 503 before that.
    pub driver: OnceLock<DriverHandle>,
    pub ready: Arc<AtomicBool>,
    pub identity: Identity,
    pub limits: LimitsConfig,
    pub started: Instant,
    pub metrics: Metrics,
    /// Whether each evaluation makes a span (only when traces are exported over OTLP).
    pub trace_evaluations: bool,
    /// Turns true when the server begins a graceful shutdown; event streams end then.
    pub stopping: watch::Receiver<bool>,
    /// Per-peer link state for node status, when this node is part of a cluster.
    pub gossip: Option<Arc<crate::gossip_link::LinkStatus>>,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// `Some(ms since a peer was last heard from)` while this node is stale (it has peers and has
    /// heard from none for the configured time); `None` otherwise and for a node alone.
    pub fn stale_for_ms(&self) -> Option<u64> {
        self.gossip.as_ref().and_then(|g| g.stale_for_ms())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// Every route pattern, so metric labels are static strings (no allocation per request).
const ROUTES: &[&str] = &[
    "/ofrep/v1/evaluate/flags",
    "/ofrep/v1/evaluate/flags/{key}",
    "/api/v1/status",
    "/api/v1/flagsets",
    "/api/v1/flagsets/{set}",
    "/api/v1/flagsets/{set}/flags",
    "/api/v1/flagsets/{set}/flags/{key}",
    "/api/v1/flagsets/{set}/flags/{key}/toggle",
    "/api/v1/flagsets/{set}/flags/{key}/history",
    "/api/v1/flagsets/{set}/history",
    "/api/v1/flagsets/{set}/conflicts",
    "/api/v1/flagsets/{set}/broken",
    "/api/v1/flagsets/{set}/stream",
    "/api/v1/tokens",
    "/api/v1/tokens/{id}",
    "/healthz",
    "/readyz",
    "/metrics",
];

fn static_route(path: Option<&MatchedPath>) -> &'static str {
    path.and_then(|p| ROUTES.iter().find(|r| **r == p.as_str()).copied())
        .unwrap_or("other")
}

fn static_method(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Request metrics (evaluation counts live with the snapshots).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "bunting_http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        registry.register(
            "bunting_http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
        }
    }
}

/// Counts every request by route, method and status, and its latency by route. A hand-written
/// layer rather than `middleware::from_fn`: that clones the inner service per request.
#[derive(Clone)]
struct TrackLayer(Arc<AppState>);

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;
    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            state: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Track<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let route = static_route(request.extensions().get::<MatchedPath>());
        let method = static_method(request.method());
        let state = self.state.clone();
        let handled = self.inner.call(request);
        Box::pin(async move {
            let start = Instant::now();
            let response = handled.await?;
            let metrics = &state.metrics;
            metrics
                .latency
                .get_or_create(&RouteLabels { route })
                .observe(start.elapsed().as_secs_f64());
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    route,
                    method,
                    status: response.status().as_u16(),
                })
                .inc();
            Ok(response)
        })
    }
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 once loaded. A stale node is still ready (it serves what it has), but says so in the
/// body and in `Bunting-Stale: true`, so a load balancer or operator can tell.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        match state.stale_for_ms() {
            None => (StatusCode::OK, "ready").into_response(),
            Some(ms) => (
                StatusCode::OK,
                [("bunting-stale", "true")],
                format!("stale: ready, but no peer heard from for {} s", ms / 1000),
            )
                .into_response(),
        }
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response()
    }
}

async fn metrics(
    State(state): State<Arc<AppState>>,
    _reader: MetricsReader,
    connections: Option<Extension<Arc<crate::listener::ConnectionStats>>>,
) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode_registry(&mut text, &state.metrics.registry)
        .is_err()
    {
        return ApiError::internal("metrics could not be encoded").into_response();
    }
    state.snapshots.counters().render(&mut text);
    if let Some(Extension(connections)) = connections {
        connections.render(&mut text);
    }
    if let Some(gossip) = &state.gossip {
        gossip.render_metrics(&mut text, crate::driver::now_ms());
    }
    text.push_str("# EOF\n");
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// `GET /api/v1/flagsets/{set}/stream`: Server-Sent Events, one `refetchEvaluation` message per
/// change of the flag set (OFREP ADR 0008). Opened with a key in a header, or with the short-lived
/// `?streamToken=` credential from the bulk evaluation's `eventStreams` (a browser's EventSource
/// cannot set headers; a real key never goes in a URL).
async fn stream(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    Path(set): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state
        .tokens
        .authorize_stream(
            &headers,
            params.get("streamToken").map(String::as_str),
            client,
            &set,
            crate::driver::now_ms() / 1000,
        )
        .map_err(|r| r.into_api_error())?;
    if state.snapshots.get(&set).is_none() {
        return Err(ApiError::not_found(format!(
            "flag set {set:?} does not exist"
        )));
    }
    let mut stopping = state.stopping.clone();
    let stop = async move {
        // Ends the stream on shutdown (or when the sender is gone).
        let _ = stopping.wait_for(|s| *s).await;
    };
    let events = BroadcastStream::new(state.snapshots.subscribe())
        .filter_map(move |notice| {
            let set = set.clone();
            async move {
                let data = match notice {
                    Ok(n) if *n.flag_set == *set => json!({
                        "type": "refetchEvaluation",
                        "etag": n.version,
                        "lastModified": n.changed_at,
                    }),
                    Ok(_) => return None,
                    // Missed notices: tell the client to refetch anyway.
                    Err(BroadcastStreamRecvError::Lagged(_)) => {
                        json!({"type": "refetchEvaluation"})
                    }
                };
                let id = match &data["etag"] {
                    serde_json::Value::String(v) => v.clone(),
                    _ => "lagged".into(),
                };
                Some(Ok::<_, Infallible>(
                    Event::default()
                        .event("message")
                        .id(id)
                        .data(data.to_string()),
                ))
            }
        })
        .take_until(stop);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::raw(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"errorDetails": "an internal error occurred while handling the request"}),
    )
    .into_response()
}

/// Admission control for OFREP and the admin API: at most `max_in_flight_requests` are handled at
/// once; others wait in a first-come queue of at most `max_queued_requests` for at most
/// `max_queue_wait_ms`, and beyond either bound get 503 with Retry-After at once (issue #12, item
/// 10): a spike is shed early instead of every request's latency growing. Health, readiness,
/// metrics and event streams never wait here.
pub struct Admission {
    slots: Semaphore,
    queued: AtomicUsize,
    max_queued: usize,
    max_wait: Duration,
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Admission {
        Admission {
            slots: Semaphore::new(
                limits
                    .max_in_flight_requests
                    .clamp(1, Semaphore::MAX_PERMITS),
            ),
            queued: AtomicUsize::new(0),
            max_queued: limits.max_queued_requests,
            max_wait: Duration::from_millis(limits.max_queue_wait_ms.max(1)),
        }
    }
}

/// One place in the admission queue; given back when dropped (also when the client leaves).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The 503 a shed request gets: fixed bytes, no serialisation, so shedding stays cheap. It carries
/// both the admin API's and OFREP's error members.
fn overloaded() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::RETRY_AFTER, HeaderValue::from_static("1")),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        "{\"error\":\"overloaded\",\"message\":\"the node is at capacity; retry after 1 s\",\
         \"errorCode\":\"GENERAL\",\"errorDetails\":\"the node is at capacity; retry after 1 s\"}",
    )
        .into_response()
}

impl Admission {
    /// A slot for one request: at once when one is free, else after waiting in the queue; the
    /// 503 to answer when there is no queue place or the wait runs out.
    async fn enter(&self) -> Result<SemaphorePermit<'_>, Response> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded());
        }
        let _queued = Queued(&self.queued);
        match tokio::time::timeout(self.max_wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(overloaded()),
        }
    }
}

/// Admission and the request deadline for OFREP and the admin API, in one layer.
#[derive(Clone)]
struct GuardLayer {
    admission: Arc<Admission>,
    timeout: Duration,
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            admission: self.admission.clone(),
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
struct Guard<S> {
    inner: S,
    admission: Arc<Admission>,
    timeout: Duration,
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let admission = self.admission.clone();
        let timeout = self.timeout;
        // Lazy: the handler runs only when polled, after admission.
        let handled = self.inner.call(request);
        Box::pin(async move {
            let _slot = match admission.enter().await {
                Ok(slot) => slot,
                Err(shed) => return Ok(shed),
            };
            Ok(within(handled, timeout).await)
        })
    }
}

/// Runs a handler under the request timeout (408 past it). The timer is armed only when the
/// handler does not finish in its first poll: an evaluation does, so the hot path sets no timer
/// and reads no clock; a handler that waits (a slow body, an admin write) gets its deadline from
/// that first wait.
async fn within<F>(handled: F, timeout: Duration) -> Response
where
    F: Future<Output = Result<Response, Infallible>>,
{
    let mut handled = std::pin::pin!(handled);
    let first = std::future::poll_fn(|cx| {
        Poll::Ready(match handled.as_mut().poll(cx) {
            Poll::Ready(Ok(response)) => Some(response),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => None,
        })
    })
    .await;
    if let Some(response) = first {
        return response;
    }
    match tokio::time::timeout(timeout, handled).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
    }
}

/// Every route of the node.
pub fn router(state: Arc<AppState>) -> Router {
    let admission = Arc::new(Admission::new(&state.limits));
    router_with(state, admission)
}

/// What the accepting thread answers itself on a fresh connection (see [`crate::listener`]):
/// the health probes only, counted like the same routes of [`router`].
pub fn probe_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .route_layer(TrackLayer(state.clone()))
        .with_state(state)
}

fn router_with(state: Arc<AppState>, admission: Arc<Admission>) -> Router {
    let limits = &state.limits;
    let evaluation = Router::new()
        .route("/ofrep/v1/evaluate/flags", post(ofrep::evaluate_all))
        .route("/ofrep/v1/evaluate/flags/{key}", post(ofrep::evaluate_flag))
        .layer(DefaultBodyLimit::max(limits.max_evaluation_body_bytes));
    let api = Router::new()
        .route("/api/v1/status", get(admin::status))
        .route(
            "/api/v1/flagsets",
            get(admin::list_sets).post(admin::create_set),
        )
        .route(
            "/api/v1/flagsets/{set}",
            get(admin::download_set).put(admin::upload_set),
        )
        .route(
            "/api/v1/flagsets/{set}/flags",
            get(admin::list_flags).post(admin::create_flag),
        )
        .route(
            "/api/v1/flagsets/{set}/flags/{key}",
            get(admin::get_flag)
                .put(admin::put_flag)
                .patch(admin::patch_flag)
                .delete(admin::delete_flag),
        )
        .route(
            "/api/v1/flagsets/{set}/flags/{key}/toggle",
            post(admin::toggle_flag),
        )
        .route(
            "/api/v1/flagsets/{set}/flags/{key}/history",
            get(admin::flag_history),
        )
        .route("/api/v1/flagsets/{set}/history", get(admin::history))
        .route("/api/v1/flagsets/{set}/conflicts", get(admin::conflicts))
        .route("/api/v1/flagsets/{set}/broken", get(admin::broken))
        .route(
            "/api/v1/tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route(
            "/api/v1/tokens/{id}",
            axum::routing::delete(admin::revoke_token),
        )
        .layer(DefaultBodyLimit::max(limits.max_admin_body_bytes));
    // Everything but the event stream (which lives until the client leaves) has a deadline.
    let guard = GuardLayer {
        admission,
        timeout: limits.request_timeout(),
    };
    evaluation
        .merge(api)
        .layer(guard)
        .route("/api/v1/flagsets/{set}/stream", get(stream))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .route_layer(TrackLayer(state.clone()))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use bunting_store::MemoryStore;
    use tower::ServiceExt;

    fn loading_state() -> Arc<AppState> {
        let tokens = Tokens::load(Arc::new(MemoryStore::new()), 100, 100).unwrap();
        tokens.bootstrap("root", 0).unwrap();
        Arc::new(AppState {
            snapshots: Arc::new(Snapshots::default()),
            tokens: Arc::new(tokens),
            driver: OnceLock::new(),
            ready: Arc::new(AtomicBool::new(false)),
            identity: Identity {
                node: "n".into(),
                region: "r".into(),
                incarnation: 1,
            },
            limits: LimitsConfig::default(),
            started: Instant::now(),
            metrics: Metrics::default(),
            trace_evaluations: false,
            stopping: watch::channel(false).1,
            gossip: None,
        })
    }

    async fn status(app: Router, method: &str, uri: &str) -> u16 {
        let request = HttpRequest::builder()
            .method(method)
            .uri(uri)
            .header("authorization", "Bearer root")
            .header("content-type", "application/json")
            .body(Body::from("{\"context\":{}}"))
            .unwrap();
        app.oneshot(request).await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn node_that_is_still_loading_is_alive_but_not_ready() {
        let state = loading_state();
        assert_eq!(status(router(state.clone()), "GET", "/healthz").await, 200);
        assert_eq!(status(router(state.clone()), "GET", "/readyz").await, 503);
        assert_eq!(
            status(router(state.clone()), "POST", "/ofrep/v1/evaluate/flags/x").await,
            503
        );
        assert_eq!(
            status(router(state.clone()), "GET", "/api/v1/flagsets").await,
            503
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(status(router(state), "GET", "/readyz").await, 200);
    }

    /// A router whose one route holds its admission slot until `release` is notified.
    fn held_router(admission: Arc<Admission>, release: Arc<tokio::sync::Notify>) -> Router {
        Router::new()
            .route(
                "/held",
                get(move || {
                    let release = release.clone();
                    async move {
                        release.notified().await;
                        "done"
                    }
                }),
            )
            .layer(GuardLayer {
                admission,
                timeout: Duration::from_secs(30),
            })
    }

    async fn get_status(app: Router) -> (u16, Option<String>) {
        let request = HttpRequest::builder()
            .uri("/held")
            .body(Body::empty())
            .unwrap();
        let r = app.oneshot(request).await.unwrap();
        let retry = r
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), retry)
    }

    #[tokio::test]
    async fn requests_past_the_admission_slots_and_queue_are_shed_with_retry_after() {
        let limits = LimitsConfig {
            max_in_flight_requests: 1,
            max_queued_requests: 1,
            max_queue_wait_ms: 50,
            ..LimitsConfig::default()
        };
        let admission = Arc::new(Admission::new(&limits));
        let release = Arc::new(tokio::sync::Notify::new());
        let app = held_router(admission.clone(), release.clone());
        let first = tokio::spawn(get_status(app.clone()));
        while admission.slots.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        // The one queue place: waits its 50 ms, then is shed (the slot is never given back).
        let queued = tokio::spawn(get_status(app.clone()));
        while admission.queued.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // No queue place left: shed at once.
        assert_eq!(get_status(app.clone()).await, (503, Some("1".into())));
        assert_eq!(queued.await.unwrap(), (503, Some("1".into())));
        assert_eq!(admission.queued.load(Ordering::Acquire), 0);
        release.notify_one();
        assert_eq!(first.await.unwrap().0, 200);
        // The slot is back.
        release.notify_one();
        assert_eq!(get_status(app).await.0, 200);
    }

    #[tokio::test]
    async fn a_handler_still_waiting_at_the_request_timeout_gets_408_and_frees_its_slot() {
        let admission = Arc::new(Admission::new(&LimitsConfig::default()));
        let slots = admission.slots.available_permits();
        let app = Router::new()
            .route("/never", get(std::future::pending::<&'static str>))
            .route("/at-once", get(|| async { "done" }))
            .layer(GuardLayer {
                admission: admission.clone(),
                timeout: Duration::from_millis(50),
            });
        assert_eq!(status(app.clone(), "GET", "/at-once").await, 200);
        assert_eq!(status(app, "GET", "/never").await, 408);
        assert_eq!(admission.slots.available_permits(), slots);
    }

    #[tokio::test]
    async fn health_is_answered_while_every_admission_slot_is_taken() {
        let state = loading_state();
        state.ready.store(true, Ordering::Release);
        let limits = LimitsConfig {
            max_in_flight_requests: 1,
            max_queued_requests: 0,
            ..LimitsConfig::default()
        };
        let admission = Arc::new(Admission::new(&limits));
        let _taken = admission.slots.try_acquire().unwrap();
        let app = router_with(state, admission.clone());
        assert_eq!(
            status(app.clone(), "POST", "/ofrep/v1/evaluate/flags/x").await,
            503
        );
        assert_eq!(status(app.clone(), "GET", "/api/v1/flagsets").await, 503);
        assert_eq!(status(app.clone(), "GET", "/healthz").await, 200);
        assert_eq!(status(app.clone(), "GET", "/readyz").await, 200);
        assert_eq!(status(app, "GET", "/metrics").await, 200);
    }
}
