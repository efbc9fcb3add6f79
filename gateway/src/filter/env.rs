//! The gateway's side of the proxy-wasm host: callouts and gRPC streams to configured clusters
//! and the `weir_rate_limit` foreign function (governor).

use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use http_body_util::BodyExt;
use weir_wasm_host::{
    CallError, CallResponse, ForeignFunction, GrpcRequestBody, GrpcResponseBody, GrpcStreamFuture,
    HostEnv, RATE_LIMIT_FUNCTION, Status,
};

use crate::Shared;
use crate::body::{BoxError, ProxyBody};
use crate::ratelimit::{QuotaDecision, QuotaLimiters, TooManyQuotas};
use crate::upstream::cluster::{Cluster, PickContext};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::h2pool::H2Pool;

/// Largest callout response body read (1 MiB, like Envoy's default buffer).
const CALLOUT_BODY_LIMIT: usize = 1 << 20;

/// The host environment of one plugin.
pub struct GatewayEnv {
    shared: Weak<Shared>,
    /// `weir_rate_limit`, made once: a filter may call it on every request.
    rate_limit: ForeignFunction,
}

impl GatewayEnv {
    /// An environment for a plugin whose `weir_rate_limit` quota is `requests` per `per`.
    pub fn new(shared: Weak<Shared>, requests: u32, per: Duration, burst: u32) -> GatewayEnv {
        let requests = NonZeroU32::new(requests.max(1)).expect("positive");
        let burst = NonZeroU32::new(burst.max(1)).expect("positive");
        let quota = Quota::with_period(per.max(Duration::from_nanos(1)) / requests.get())
            .unwrap_or_else(|| Quota::per_second(requests))
            .allow_burst(burst);
        GatewayEnv {
            shared,
            rate_limit: rate_limit_function(DefaultKeyedRateLimiter::keyed(quota)),
        }
    }
}

/// `weir_rate_limit`: calls without a quota take from `limiter` (the plugin's `rate_limit:`);
/// calls that carry their own quota have buckets of their own.
fn rate_limit_function(limiter: DefaultKeyedRateLimiter<Vec<u8>>) -> ForeignFunction {
    let quotas = QuotaLimiters::default();
    Arc::new(move |args: &[u8]| {
        let call = weir_wasm_host::decode_rate_limit_request(args)?;
        if let Some(quota) = call.quota {
            return match quotas.check(quota, call.key, call.cost) {
                Ok(QuotaDecision::Allowed { remaining }) => {
                    Ok(weir_wasm_host::encode_rate_limit_allowed(remaining))
                }
                Ok(QuotaDecision::Limited { retry_after }) => {
                    Ok(weir_wasm_host::encode_rate_limit_result(false, retry_after))
                }
                Err(TooManyQuotas) => Err(Status::InternalFailure),
            };
        }
        let cost = NonZeroU32::new(call.cost.max(1)).ok_or(Status::BadArgument)?;
        let key = call.key.as_bytes().to_vec();
        match limiter.check_key_n(&key, cost) {
            Ok(Ok(())) => Ok(weir_wasm_host::encode_rate_limit_result(
                true,
                Duration::ZERO,
            )),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                Ok(weir_wasm_host::encode_rate_limit_result(false, wait))
            }
            // More than the burst can ever allow.
            Err(_) => Ok(weir_wasm_host::encode_rate_limit_result(
                false,
                Duration::MAX,
            )),
        }
    })
}

impl GatewayEnv {
    /// The live cluster named `name` in the current snapshot.
    fn cluster(&self, name: &str) -> Result<Arc<Cluster>, CallError> {
        self.shared
            .upgrade()
            .and_then(|s| s.snapshot.load().clusters.get(name).cloned())
            .ok_or_else(|| CallError::UnknownCluster(name.to_string()))
    }
}

/// An endpoint of `cluster` for a callout or stream with `headers` (for ring hash).
fn pick(cluster: &Cluster, headers: &http::HeaderMap) -> Result<Arc<Endpoint>, CallError> {
    let ctx = PickContext {
        headers,
        client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        random: rand::random(),
    };
    cluster
        .pick(None, &ctx, None)
        .ok_or_else(|| CallError::Reset("no healthy upstream".into()))
}

/// The path and query of `uri` (`/` when it has none).
fn path_of(uri: &http::Uri) -> String {
    uri.path_and_query().map_or("/", |p| p.as_str()).to_string()
}

/// Send a callout or stream request over the cluster's HTTP/2 connection to `ep`: the URI
/// gets the cluster's scheme and the request's `Host` (else the cluster name) as authority.
async fn send_h2(
    cluster: &Cluster,
    pool: &H2Pool,
    ep: &Endpoint,
    mut parts: http::request::Parts,
    body: ProxyBody,
) -> Result<http::Response<hyper::body::Incoming>, CallError> {
    let scheme = if cluster.spec().tls.is_some() {
        "https"
    } else {
        "http"
    };
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(&cluster.name)
        .to_string();
    let path = path_of(&parts.uri);
    parts.uri = format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|_| CallError::Reset("invalid :path".into()))?;
    parts.version = http::Version::HTTP_2;
    parts.headers.remove(http::header::HOST);
    let mut sender = pool
        .sender(ep.addr)
        .await
        .map_err(|e| CallError::Reset(e.to_string()))?;
    sender
        .send_request(http::Request::from_parts(parts, body))
        .await
        .map_err(|e| CallError::Reset(e.to_string()))
}

impl HostEnv for GatewayEnv {
    fn has_cluster(&self, cluster: &str) -> bool {
        self.cluster(cluster).is_ok()
    }

    fn http_call(
        &self,
        cluster: &str,
        request: http::Request<Bytes>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'static, Result<CallResponse, CallError>> {
        let cluster = self.cluster(cluster);
        Box::pin(async move {
            let cluster = cluster?;
            let call = async {
                let ep = pick(&cluster, request.headers())?;
                let _active = ep.start_request();
                let (mut parts, body) = request.into_parts();
                let trailers = parts.extensions.remove::<weir_wasm_host::CallTrailers>();
                let body = match trailers {
                    Some(t) if !t.0.is_empty() => http_body_util::Full::new(body)
                        .map_err(|never| match never {})
                        .with_trailers(async move { Some(Ok(t.0)) })
                        .boxed(),
                    _ => crate::body::full(body),
                };
                let resp = match cluster.h2() {
                    Some(pool) => send_h2(&cluster, pool, &ep, parts, body).await?,
                    None => {
                        let path = path_of(&parts.uri);
                        parts.uri = format!("http://{}{path}", ep.authority)
                            .parse()
                            .map_err(|_| CallError::Reset("invalid :path".into()))?;
                        parts.version = http::Version::HTTP_11;
                        let req = http::Request::from_parts(parts, body);
                        cluster
                            .client()
                            .request(req)
                            .await
                            .map_err(|e| CallError::Reset(e.to_string()))?
                    }
                };
                let (parts, body) = resp.into_parts();
                let collected = http_body_util::Limited::new(body, CALLOUT_BODY_LIMIT)
                    .collect()
                    .await
                    .map_err(|e| CallError::Reset(e.to_string()))?;
                let trailers = collected.trailers().cloned().unwrap_or_default();
                Ok(CallResponse {
                    response: http::Response::from_parts(parts, collected.to_bytes()),
                    trailers,
                })
            };
            match timeout {
                Some(t) => tokio::time::timeout(t, call)
                    .await
                    .map_err(|_| CallError::Timeout)?,
                None => call.await,
            }
        })
    }

    fn grpc_stream(
        &self,
        cluster: &str,
        request: http::Request<GrpcRequestBody>,
    ) -> Result<GrpcStreamFuture, CallError> {
        let cluster = self.cluster(cluster)?;
        if cluster.h2().is_none() {
            return Err(CallError::Unsupported(format!(
                "cluster {} does not speak HTTP/2 (set protocol: http2 for gRPC streams)",
                cluster.name
            )));
        }
        Ok(Box::pin(async move {
            let Some(pool) = cluster.h2() else {
                return Err(CallError::Unsupported("no HTTP/2".into()));
            };
            let ep = pick(&cluster, request.headers())?;
            // Counted as active until the response headers, like a proxied request.
            let _active = ep.start_request();
            let (parts, body) = request.into_parts();
            // A cancelled stream fails its request body: hyper then resets the HTTP/2 stream.
            let body = body.map_err(|e| -> BoxError { Box::new(e) }).boxed();
            let resp = send_h2(&cluster, pool, &ep, parts, body).await?;
            Ok(resp.map(|b| -> GrpcResponseBody { Box::pin(crate::body::incoming(b)) }))
        }))
    }

    fn foreign_function(&self, name: &str) -> Option<ForeignFunction> {
        (name == RATE_LIMIT_FUNCTION).then(|| self.rate_limit.clone())
    }
}
