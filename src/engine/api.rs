//! The engine API over HTTPS. Callers present a Kubernetes bearer token (TokenReview) and are
//! authorised with SubjectAccessReviews, so RBAC decides who may do what:
//!
//! - `GET /v1/resolve?policy=&cluster=[&pool=][&vm=]` and `POST /v1/console`: `get` on the
//!   `clusterconsolepolicies` named by `policy`;
//! - a console whose proxy is a SpiceProxy with tickets additionally needs `create` on
//!   `spiceproxies/tickets` for that SpiceProxy, in its namespace (a RoleBinding there).
//!
//! Yes answers are kept briefly (`auth_cache.rs`), no answers are not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use serde::Deserialize;

use super::ConsoleRequest;
use super::auth_cache::{self, Access, AuthCache, TokenDigest};
use super::service::{Caches, Engine, EngineError};
use crate::crd::SpiceProxyRef;
use crate::metrics::{EngineRequestLabel, KindLabel, Metrics, RouteLabel};

pub const GROUP: &str = "console.spice-operator.io";

struct AppState {
    engine: Engine,
    client: Client,
    auth: AuthCache,
    metrics: Arc<Metrics>,
}

impl AppState {
    fn reviewed(&self, kind: &str) {
        self.metrics.engine_reviews.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }
}

/// The API's routes; requests read policies and SpiceProxies from `caches` (every replica keeps
/// its own), and the API server's yes to a caller's token or access is kept for `auth_ttl`.
pub fn router(client: Client, caches: Caches, metrics: Arc<Metrics>, auth_ttl: Duration) -> axum::Router {
    let engine = Engine { client: client.clone(), caches: Some(caches) };
    let state = Arc::new(AppState { engine, client, auth: AuthCache::new(auth_ttl), metrics: metrics.clone() });
    axum::Router::new()
        .route("/v1/resolve", get(resolve))
        .route("/v1/console", post(console))
        // Only the routes above are counted: not probes of /healthz, nor unknown paths.
        .route_layer(axum::middleware::from_fn_with_state(metrics, counted))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

/// Counts and times each request by route and the status of its answer. As a route layer it
/// sees only matched routes, which have no path parameters: the path is the route.
async fn counted(State(metrics): State<Arc<Metrics>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.engine_requests.get_or_create(&EngineRequestLabel { route: route.clone(), code: response.status().as_u16() }).inc();
    metrics.engine_duration.get_or_create(&RouteLabel { route }).observe(started.elapsed().as_secs_f64());
    response
}

/// An error as the engine sees it: a status and a JSON body saying why.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(serde_json::json!({"code": self.0.as_u16(), "error": self.1}))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        if let EngineError::Kube(k) = &e {
            tracing::warn!(error = %k, "engine API: Kubernetes call failed");
        }
        ApiError(StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY), e.to_string())
    }
}

/// A caller the API server vouched for: its token's digest (the key of its cached decisions)
/// and who it is.
struct Caller {
    token: TokenDigest,
    user: UserInfo,
}

/// Who is calling, from the bearer token (TokenReview, or a recent answer to one).
async fn authenticate(app: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = |why: &str| ApiError(StatusCode::UNAUTHORIZED, why.to_string());
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| unauthorized("no bearer token: send Authorization: Bearer <Kubernetes token>"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header is not a bearer token"))?;
    let digest = auth_cache::digest(token);
    if let Some(user) = app.auth.user(&digest, Instant::now()) {
        return Ok(Caller { token: digest, user });
    }
    let review = TokenReview { spec: TokenReviewSpec { token: token.to_string(), ..Default::default() }, ..Default::default() };
    app.reviewed("TokenReview");
    let reviewed = Api::<TokenReview>::all(app.client.clone()).create(&PostParams::default(), &review).await.map_err(|e| {
        tracing::warn!(error = %e, "TokenReview failed");
        ApiError(StatusCode::BAD_GATEWAY, "cannot verify the token with the Kubernetes API".into())
    })?;
    let status = reviewed.status.unwrap_or_default();
    match (status.authenticated, status.user) {
        (Some(true), Some(user)) => {
            app.auth.remember_user(digest, &user, Instant::now());
            Ok(Caller { token: digest, user })
        }
        _ => Err(unauthorized(&format!("the token is not valid{}", status.error.map(|e| format!(": {e}")).unwrap_or_default()))),
    }
}

/// RBAC decides (SubjectAccessReview for the caller, or a recent yes to the same question).
async fn authorize(app: &AppState, caller: &Caller, access: Access) -> Result<(), ApiError> {
    if app.auth.granted(&caller.token, &access, Instant::now()) {
        return Ok(());
    }
    let user = &caller.user;
    let Access { verb, resource, subresource, namespace, name } = &access;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(resource.clone()),
                subresource: subresource.clone(),
                namespace: namespace.clone(),
                name: Some(name.clone()),
                verb: Some(verb.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    app.reviewed("SubjectAccessReview");
    let reviewed = Api::<SubjectAccessReview>::all(app.client.clone()).create(&PostParams::default(), &review).await.map_err(|e| {
        tracing::warn!(error = %e, "SubjectAccessReview failed");
        ApiError(StatusCode::BAD_GATEWAY, "cannot check permissions with the Kubernetes API".into())
    })?;
    let status = reviewed.status.unwrap_or_default();
    if status.allowed {
        app.auth.remember_grant(&caller.token, &access, Instant::now());
        return Ok(());
    }
    let what = match (subresource, namespace) {
        (Some(sub), Some(ns)) => format!("{verb} {resource}/{sub} {name:?} in namespace {ns:?}"),
        (None, Some(ns)) => format!("{verb} {resource} {name:?} in namespace {ns:?}"),
        (Some(sub), None) => format!("{verb} {resource}/{sub} {name:?}"),
        (None, None) => format!("{verb} {resource} {name:?}"),
    };
    let user_name = user.username.clone().unwrap_or_default();
    let why = if status.reason.as_deref().unwrap_or("").is_empty() { String::new() } else { format!(" ({})", status.reason.unwrap_or_default()) };
    Err(ApiError(StatusCode::FORBIDDEN, format!("{user_name} may not {what} in API group {GROUP}{why}")))
}

/// `get` on a policy: what resolving or issuing a console for one of its VMs needs.
fn read_policy(policy: &str) -> Access {
    Access { verb: "get".into(), resource: "clusterconsolepolicies".into(), subresource: None, namespace: None, name: policy.into() }
}

#[derive(Deserialize)]
struct ResolveQuery {
    policy: String,
    cluster: String,
    pool: Option<String>,
    vm: Option<String>,
}

async fn resolve(State(app): State<Arc<AppState>>, headers: HeaderMap, query: Result<Query<ResolveQuery>, axum::extract::rejection::QueryRejection>) -> Result<Response, ApiError> {
    let caller = authenticate(&app, &headers).await?;
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e}: policy and cluster are required, pool and vm optional")))?;
    authorize(&app, &caller, read_policy(&q.policy)).await?;
    let r = app.engine.resolve(&q.policy, &q.cluster, q.pool.as_deref(), q.vm.as_deref()).await?;
    Ok(Json(r).into_response())
}

async fn console(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Result<Json<ConsoleRequest>, axum::extract::rejection::JsonRejection>) -> Result<Response, ApiError> {
    let caller = authenticate(&app, &headers).await?;
    let Json(request) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    authorize(&app, &caller, read_policy(&request.policy)).await?;
    let prepared = app.engine.prepare(request).await?;
    if let Some((SpiceProxyRef { name, namespace }, _)) = &prepared.ticket_for {
        let mint = Access { verb: "create".into(), resource: "spiceproxies".into(), subresource: Some("tickets".into()), namespace: Some(namespace.clone()), name: name.clone() };
        authorize(&app, &caller, mint).await?;
    }
    let console = Engine::issue(prepared, caller.user.username.as_deref().unwrap_or("unknown"));
    let wants_json = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"));
    if wants_json {
        return Ok(Json(console).into_response());
    }
    let mut resp = console.vv.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-virt-viewer"));
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"console.vv\""));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(url) = console.html5_url.and_then(|u| HeaderValue::from_str(&u).ok()) {
        h.insert("x-spice-html5-url", url);
    }
    Ok(resp)
}
